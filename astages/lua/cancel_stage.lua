-- Cancel stage ARGV[6]: its jobs not yet final are cancelled, its
-- callbacks fire, and a running group moves on to its next stage.
-- Returns {outcome, stage, jobs still to send} or 'GROUP_GONE', 'STAGE_GONE',
-- 'STAGE_COMPLETE', 'STAGE_CANCELLED'.
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
local n = ARGV[6]
local st = redis.call('HGET', stage_key(n), 'status')
if not st then return 'STAGE_GONE' end
if st == 'complete' then return 'STAGE_COMPLETE' end
if st == 'cancelled' then return 'STAGE_CANCELLED' end
local now = now_ms()
cancel_stage(n, now)
if redis.call('HGET', G, 'status') ~= 'running' then return {'cancelled', n, 0} end
return advance(now)
