-- Send job ARGV[7] of stage ARGV[6] to arq now: a pending job of a running stage is
-- queued, a job waiting for a retry is moved to the front of its queue. A job of a stage
-- that is not running is not sent (it would run before the stages ahead of it ended).
-- A pending job goes past its stage's window and rate, but not past a max_in_flight cap
-- of its stage or group.
-- Returns 'queued', 'hurried', or 'gone', 'final', 'busy' (queued or running already),
-- 'not_running' (its stage is pending), 'capped' (a cap is full: it waits its turn).
if redis.call('EXISTS', G) == 0 then return 'gone' end
local n, seq = ARGV[6], ARGV[7]
local sk = stage_key(n)
local cur = redis.call('HGET', sk .. ':open', seq)
if not cur then
  if redis.call('HEXISTS', sk .. ':done', seq) == 1 then return 'final' end
  return 'gone'
end
local now = now_ms()
local c = string.sub(cur, 1, 1)
if c == 'p' then
  if redis.call('HGET', sk, 'status') ~= 'running' then return 'not_running' end
  -- past the stage's window and rate (the caller asks for this job now), never past a cap
  local cap = tonumber(redis.call('HGET', sk, 'max_in_flight'))
  if cap and stage_in_flight(sk) >= cap then return 'capped' end
  local g_room = group_room()
  if g_room and g_room <= 0 then return 'capped' end
  if not send(sk, n, seq, now) then
    -- its spec was unusable: it failed instead (it may have been the stage's last open job)
    if sent_failed(n, 1) then stop_group(now, 'failed') else after_job_left(n, now) end
    return 'final'
  end
  event({'job', n .. ':' .. seq, 'from', 'pending', 'to', 'queued'})
  return 'queued'
end
if c == 'e' then
  local _, _, _, queue, _ = parse_spec(redis.call('HGET', sk .. ':spec', seq))
  if queue then redis.call('ZADD', queue, 'XX', int(due(now)), job_id(n, seq)) end
  return 'hurried'
end
return 'busy'
