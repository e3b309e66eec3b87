-- Start stage ARGV[6] (or keep sending it when it runs already, as far as its window,
-- caps and rate let: see top_up in _lib.lua); the group is in motion from then on. An empty stage completes at once and the group moves on.
-- Returns {outcome, stage, jobs still to send} or 'GROUP_GONE', 'STAGE_GONE',
-- 'STAGE_COMPLETE', 'STAGE_CANCELLED'.
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
local n = ARGV[6]
local sk = stage_key(n)
local st = redis.call('HGET', sk, 'status')
if not st then return 'STAGE_GONE' end
if st == 'complete' then return 'STAGE_COMPLETE' end
if st == 'cancelled' then return 'STAGE_CANCELLED' end
local now = now_ms()
if redis.call('HGET', G, 'status') ~= 'running' then
  redis.call('HSET', G, 'status', 'running', 'initiated', now)
end
if st == 'pending' then
  redis.call('HSET', sk, 'status', 'running', 'started', now)
  event({'stage', n, 'to', 'running', 'jobs', redis.call('HLEN', sk .. ':open')})
end
local left, _, failed = top_up(n, now, SEND_LIMIT, group_room())
if sent_failed(n, failed) then return stop_group(now, 'failed') end
if left > 0 then return {'running', n, left} end
return after_job_left(n, now)
