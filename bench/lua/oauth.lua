-- POST a form body with HTTP Basic client authentication (OAuth client_credentials).
-- wrk -s oauth.lua URL -- BODY AUTHORIZATION   (AUTHORIZATION: the whole "Basic ..." value)
dofile(os.getenv("BENCH_LUA_DIR") .. "/summary.lua")

function init(args)
  wrk.method = "POST"
  wrk.body = args[1]
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
  wrk.headers["Authorization"] = args[2]
end
