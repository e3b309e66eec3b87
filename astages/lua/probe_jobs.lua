-- The sweeper's look at one batch of open jobs of stage ARGV[6] (read-only): HSCAN of
-- the stage's :open from cursor ARGV[7] (COUNT ARGV[8]), and for each job arq should
-- hold (queued, running, pending_re_run) a look at arq's keys. ARGV[9] is arq's
-- in-progress key prefix, ARGV[10] its result key prefix.
-- Returns {next cursor, jobs looked at, seq, code, state, seq, code, state, ...} listing
-- only the jobs arq no longer holds: state 'result' (arq wrote a final result) or
-- 'none' (no job record, not in progress, no result). A job with a job record or an
-- in-progress key is arq's to run and is left out.
if not ARGV[6] or redis.call('EXISTS', G) == 0 then return {'0', 0} end
local n = ARGV[6]
local sk = stage_key(n)
local scan = redis.call('HSCAN', sk .. ':open', ARGV[7], 'COUNT', ARGV[8])
local flat = scan[2]
local out = {scan[1], #flat / 2}
for i = 1, #flat, 2 do
  local seq, code = flat[i], flat[i + 1]
  local c = string.sub(code, 1, 1)
  if c == 'q' or c == 'r' or c == 'e' then
    local id = job_id(n, seq)
    local state = nil
    if redis.call('EXISTS', ARGV[10] .. id) == 1 then
      state = 'result'
    elseif redis.call('EXISTS', ARQ_JOB .. id) == 0 and redis.call('EXISTS', ARGV[9] .. id) == 0 then
      state = 'none'
    end
    if state then
      out[#out + 1] = seq; out[#out + 1] = code; out[#out + 1] = state
    end
  end
end
return out
