-- wrk script: POST signed Chargify webhook bodies to the gateway, in turn.
--
-- wrk -s post.lua URL -- BODIES_FILE   (one "signature<TAB>body" per line)
-- With BENCH_RATE=N in the environment, each wrk thread sends N requests/s on a fixed
-- schedule (request k is due at start + k/N s, whatever the answers' latency), the way
-- wrk2 does; without it, every connection sends its next request as soon as it has an
-- answer (saturation). Debian's wrk is built with LuaJIT, whose ffi gives a monotonic
-- clock in milliseconds (wrk's Lua API has none finer than a second).

local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local requests = {}
local turn = 0

function init(args)
  for line in io.lines(args[1]) do
    local sig, body = line:match("^(%x+)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", "/webhooks/chargify", {
      ["Content-Type"] = "application/x-www-form-urlencoded",
      ["X-Chargify-Webhook-Signature-Hmac-Sha-256"] = sig,
    }, body)
  end
  assert(#requests > 0, "no bodies in " .. args[1])
end

function request()
  turn = turn % #requests + 1
  return requests[turn]
end

if rate > 0 then
  local ffi = require("ffi")
  ffi.cdef([[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]])
  local ts = ffi.new("bench_timespec")
  local CLOCK_MONOTONIC = 1
  local interval_ms = 1000 / rate
  local due = nil

  local function now_ms()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end

  -- Called before each request: wait until that request's slot in the schedule.
  function delay()
    local now = now_ms()
    due = (due or now) + interval_ms
    local wait = due - now
    if wait < 0 then return 0 end
    return math.floor(wait)
  end
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, '
      .. '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
