-- POST a JSON login body; keep every token pair the server hands out.
-- wrk -s login.lua URL -- BODY OUT_PREFIX   (writes OUT_PREFIX<thread>.txt: access TAB refresh)
dofile(os.getenv("BENCH_LUA_DIR") .. "/summary.lua")

function init(args)
  wrk.method = "POST"
  wrk.body = args[1]
  wrk.headers["Content-Type"] = "application/json"
  out = io.open(args[2] .. id .. ".txt", "a")
end

function response(status, headers, body)
  if status == 200 then
    local access = body:match('"access_token"%s*:%s*"([^"]+)"')
    local refresh = body:match('"refresh_token"%s*:%s*"([^"]+)"')
    if access and refresh then
      out:write(access, "\t", refresh, "\n")
      out:flush()
    end
  end
end
