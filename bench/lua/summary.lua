-- Shared by every bench script: number the threads (thread variable "id"), and print one
-- machine-readable result line at the end. Scripts that send filler requests count them in
-- a thread variable "filler".

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local e = summary.errors
  local filler = 0
  for _, thread in ipairs(threads) do
    filler = filler + (thread:get("filler") or 0)
  end
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"non2xx":%d,"socket_errors":%d,"filler":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout, filler))
end
