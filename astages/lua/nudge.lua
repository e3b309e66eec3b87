-- Move a running group on when nothing else will (the sweeper's repair): a running
-- stage with no open job and nothing left to send completes, a running group with no
-- running stage starts its next stage (or finishes), and a stage whose chunked sending
-- stopped is sent on. Does what the scripts that stopped half-way would have done, so
-- calling it on a healthy group changes nothing but the next chunk to send.
-- Returns {outcome, stage, jobs still to send} or 'GROUP_GONE'.
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
if redis.call('HGET', G, 'status') ~= 'running' then return {'pending', '', 0} end
local now = now_ms()
for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
  local sk = stage_key(n)
  if redis.call('HGET', sk, 'status') == 'running' and redis.call('HLEN', sk .. ':open') == 0
      and tonumber(redis.call('HGET', sk, 'cursor') or '0') >= redis.call('LLEN', sk .. ':jobs') then
    return after_job_left(n, now)
  end
end
return advance(now)
