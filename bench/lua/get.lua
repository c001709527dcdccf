-- GET with a fixed Bearer token: wrk -s get.lua URL -- TOKEN
dofile(os.getenv("BENCH_LUA_DIR") .. "/summary.lua")

function init(args)
  wrk.headers["Authorization"] = "Bearer " .. args[1]
end
