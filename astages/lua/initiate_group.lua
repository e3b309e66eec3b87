-- Start the group: mark it running and move it on (see advance in _lib.lua).
-- Returns {outcome, stage, jobs still to send} or 'GROUP_GONE'.
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
if group_final() then return {'finished', '', 0} end
local now = now_ms()
if redis.call('HGET', G, 'status') ~= 'running' then
  redis.call('HSET', G, 'status', 'running', 'initiated', now)
end
return advance(now)
