-- Report the outcome of try ARGV[7] of job ARGV[6] of stage ARGV[5]:
-- ARGV[8] is 's' (successful), 'f' (failed, ARGV[9] the error) or 'e' (will be re-run).
-- Idempotent: a report for a job already final, or older than the job's latest try,
-- changes nothing. Returns {outcome, stage, jobs still to send} where outcome is
-- 'gone', 'dup', 'stale', 'retry', 'open' (stage still has open jobs), 'complete',
-- 'running' (the group moved on to a stage) or 'finished' (the group is done).
if redis.call('EXISTS', G) == 0 then return {'gone', '', 0} end
local n, seq, try, outcome = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local sk = stage_key(n)
if redis.call('HEXISTS', sk .. ':done', seq) == 1 then return {'dup', n, 0} end
local cur = redis.call('HGET', sk .. ':open', seq)
if not cur then return {'gone', n, 0} end
if try_of(cur) > try then return {'stale', n, 0} end
if outcome == 'e' then
  local code = 'e' .. try
  if cur == code then return {'dup', n, 0} end
  redis.call('HSET', sk .. ':open', seq, code)
  count(sk, cur, code)
  redis.call('HINCRBY', sk, 'retried', 1)
  return {'retry', n, 0}
end
redis.call('HDEL', sk .. ':open', seq)
local code = outcome .. try
redis.call('HSET', sk .. ':done', seq, code)
count(sk, cur, code)
if outcome == 'f' then redis.call('HSET', sk .. ':err', seq, ARGV[9]) end
return after_job_left(n, now_ms())
