-- Delete job ARGV[7] of stage ARGV[6]; a job not yet started is taken out of arq's
-- queue. Deleting the last open job of a running stage completes it and moves the
-- group on. Returns {outcome, stage, jobs still to send}; outcome 'gone' when there
-- was no such job.
if redis.call('EXISTS', G) == 0 then return {'gone', '', 0} end
local n, seq = ARGV[6], ARGV[7]
local sk = stage_key(n)
local cur = redis.call('HGET', sk .. ':open', seq)
local fin = redis.call('HGET', sk .. ':done', seq)
if not cur and not fin then return {'gone', n, 0} end
local c = cur and string.sub(cur, 1, 1)
if c == 'q' or c == 'e' then unsend(sk, n, seq) end
count(sk, cur or fin, nil)
redis.call('HDEL', sk .. ':open', seq)
redis.call('HDEL', sk .. ':done', seq)
redis.call('HDEL', sk .. ':spec', seq)
redis.call('HDEL', sk .. ':msg', seq)
redis.call('HDEL', sk .. ':err', seq)
-- the cursor (index of the next job to send) moves back only for a job before it
local at = redis.call('LPOS', sk .. ':jobs', seq)
redis.call('LREM', sk .. ':jobs', 1, seq)
event({'job', n .. ':' .. seq, 'from', STATUS[string.sub(cur or fin, 1, 1)], 'to', 'deleted'})
local cursor = tonumber(redis.call('HGET', sk, 'cursor') or '0')
if at and at < cursor then redis.call('HSET', sk, 'cursor', cursor - 1) end
if not cur then return {'open', n, 0} end
return after_job_left(n, now_ms())
