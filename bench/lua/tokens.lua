-- POST once per token from a list, each thread walking its own share.
-- wrk -s tokens.lua URL -- TOKEN_FILE THREADS DONE_PREFIX   (one token per line)
-- A thread that has all its answers stops and creates DONE_PREFIX<thread>, so that the
-- caller can end the run (SIGINT) once every thread is done; spare connections park.
dofile(os.getenv("BENCH_LUA_DIR") .. "/summary.lua")

local PARK_MS = 3600000

local function finish()
  io.open(done_prefix .. id, "w"):close()
  wrk.thread:stop()
end

function init(args)
  tokens = {}
  local threads = tonumber(args[2])
  local index = 0
  for line in io.lines(args[1]) do
    if index % threads == id then
      tokens[#tokens + 1] = line
    end
    index = index + 1
  end
  done_prefix = args[3]
  next_token = 1
  filler = 0
  reserved = 0
  answers = 0
  if #tokens == 0 then
    finish()
  end
end

-- wrk asks delay() before each request() of a connection: reserve a token there.
function delay()
  if reserved >= #tokens then
    return PARK_MS
  end
  reserved = reserved + 1
  return 0
end

-- wrk regenerates a request whose TLS write must be retried, so a token can be skipped
-- and the list run out early: such filler requests carry a malformed token (a cheap 401
-- everywhere, no side effects) and are subtracted from the result.
function request()
  local token = tokens[next_token]
  if token == nil then
    filler = filler + 1
    token = "filler"
  end
  next_token = next_token + 1
  return wrk.format("POST", nil, {["Authorization"] = "Bearer " .. token}, "")
end

function response(status, headers, body)
  answers = answers + 1
  if answers == #tokens then
    finish()
  end
end
