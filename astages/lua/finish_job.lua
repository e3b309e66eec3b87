-- Report the outcome of try ARGV[8] of job ARGV[7] of stage ARGV[6]:
-- ARGV[9] is 's' (successful), 'f' (failed, ARGV[10] the error) or 'e' (will be re-run).
-- A failure that breaches the failure policy stops the group (see stop_group).
-- Idempotent: a report for a job already final, or older than the job's latest try,
-- changes nothing. Returns {outcome, stage, jobs still to send} where outcome is
-- 'gone', 'dup', 'stale', 'retry', 'open' (stage still has open jobs), 'complete',
-- 'running' (the group moved on to a stage) or 'finished' (the group is done).
if redis.call('EXISTS', G) == 0 then return {'gone', '', 0} end
local n, seq, try, outcome = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
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
  event({'job', n .. ':' .. seq, 'from', STATUS[string.sub(cur, 1, 1)], 'to', 'pending_re_run', 'try', try})
  return {'retry', n, 0}
end
redis.call('HDEL', sk .. ':open', seq)
local code = outcome .. try
redis.call('HSET', sk .. ':done', seq, code)
count(sk, cur, code)
local now = now_ms()
if outcome == 'f' then
  redis.call('HSET', sk .. ':err', seq, ARGV[10])
end
follow_ttl(sk .. ':done', sk .. ':err')  -- after the writes: PEXPIRE of a missing key does nothing
if outcome == 'f' then
  event({'job', n .. ':' .. seq, 'from', STATUS[string.sub(cur, 1, 1)], 'to', 'failed', 'try', try,
    'error', string.sub(ARGV[10], 1, 200)})
  if redis.call('HSETNX', G, 'failed_once', now) == 1 then fire('failure', 'running', now) end
  if not group_final() and policy_breached(n) then return stop_group(now, 'failed') end
else
  event({'job', n .. ':' .. seq, 'from', STATUS[string.sub(cur, 1, 1)], 'to', 'successful', 'try', try})
end
return after_job_left(n, now)
