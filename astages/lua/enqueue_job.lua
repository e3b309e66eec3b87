-- Send job ARGV[7] of stage ARGV[6] to arq now: a pending job is queued, a job waiting
-- for a retry is moved to the front of its queue. Returns 'queued', 'hurried', or
-- 'gone', 'final', 'busy' (queued or running already).
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
  send(sk, n, seq, now)
  event({'job', n .. ':' .. seq, 'from', 'pending', 'to', 'queued'})
  return 'queued'
end
if c == 'e' then
  local _, _, _, queue, _ = parse_spec(redis.call('HGET', sk .. ':spec', seq))
  redis.call('ZADD', queue, 'XX', due(now), IDBASE .. n .. ':' .. seq)
  return 'hurried'
end
return 'busy'
