-- Refresh chains: POST a refresh token, then the one its answer returns, for the whole run.
-- wrk -s chain.lua URL -- TOKEN_FILE THREADS   (one seed token per line, a few per connection)
-- Each thread keeps a queue of live tokens: a request takes the oldest, a 200 answer puts
-- the rotated refresh token back. A request finding the queue empty (its token was lost to
-- an error, or to a TLS write that wrk retried with a new request) carries a malformed
-- token instead, a cheap 401 everywhere that is subtracted from the result.
dofile(os.getenv("BENCH_LUA_DIR") .. "/summary.lua")

function init(args)
  queue = {}
  first, last = 1, 0
  local threads = tonumber(args[2])
  local index = 0
  for line in io.lines(args[1]) do
    if index % threads == id then
      last = last + 1
      queue[last] = line
    end
    index = index + 1
  end
  filler = 0
end

function request()
  local token = "filler"
  if first <= last then
    token = queue[first]
    queue[first] = nil
    first = first + 1
  else
    filler = filler + 1
  end
  return wrk.format("POST", nil, {["Authorization"] = "Bearer " .. token}, "")
end

function response(status, headers, body)
  if status == 200 then
    local token = string.match(body, '"refresh_token"%s*:%s*"([^"]+)"')
    if token ~= nil then
      last = last + 1
      queue[last] = token
    end
  end
end
