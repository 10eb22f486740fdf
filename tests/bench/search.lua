-- wrk script for the search benchmark (tests/bench/search.py runs it).
-- POST /fhir/ImagingStudy/_search for a random patient who has studies, form-encoded as
-- interface.md recommends (no NHS Number in the URL). Environment:
--   BENCH_PATIENTS  file of NHS Numbers, one a line
--   BENCH_INCLUDE   "1" adds _include=ImagingStudy:endpoint
--   BENCH_RATE      requests/s for this wrk process (0: as fast as the connections go);
--                   paced with a shared schedule so the offered rate is steady
-- done() prints one JSON line with the counts and latency percentiles (microseconds).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_usec; } bench_timeval;
int gettimeofday(bench_timeval *tv, void *tz);
]]
local tv = ffi.new("bench_timeval")
local function now_ms()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000 + tonumber(tv.tv_usec) / 1000
end

local numbers = {}
local include = os.getenv("BENCH_INCLUDE") == "1"
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local interval = rate > 0 and 1000 / rate or 0
local next_slot = 0
local headers = { ["Content-Type"] = "application/x-www-form-urlencoded",
                  ["Accept"] = "application/fhir+json" }
local prefix = "patient.identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C"
local suffix = "&_count=20" .. (include and "&_include=ImagingStudy%3Aendpoint" or "")

function init(args)
  for line in io.lines(os.getenv("BENCH_PATIENTS")) do
    numbers[#numbers + 1] = line
  end
  math.randomseed(math.floor(now_ms()) % 1000003)
end

function request()
  local n = numbers[math.random(#numbers)]
  return wrk.format("POST", "/fhir/ImagingStudy/_search", headers, prefix .. n .. suffix)
end

function delay()
  if interval == 0 then
    return 0
  end
  local now = now_ms()
  if next_slot < now then
    next_slot = now
  end
  local wait = next_slot - now
  next_slot = next_slot + interval
  return wait
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "errors_connect": %d, ' ..
    '"errors_read": %d, "errors_write": %d, "errors_status": %d, "errors_timeout": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p95_us": %d, "p99_us": %d, "p999_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(95), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
