-- Delete the group, its stages and jobs; jobs not yet started leave arq's queue and
-- waiters are told. No callback fires. Returns 1, or 0 when there was no such group
-- (its index entry is dropped anyway).
if redis.call('EXISTS', G) == 0 then
  redis.call('ZREM', INDEX, string.match(G, '{(.*)}'))
  return 0
end
-- A live group's jobs so far join the prefix's totals (an ended, kept group's already did,
-- in finish_group). Keys astages did not write (planted data) count nothing and are deleted.
local counted = {successful = 0, failed = 0, cancelled = 0, retried = 0}
local live = redis.call('TYPE', G).ok == 'hash' and not group_final()
for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
  local sk = stage_key(n)
  if live then
    local c = redis.pcall('HMGET', sk, 'successful', 'failed', 'cancelled', 'retried')
    if type(c) == 'table' and not c.err then
      counted.successful = counted.successful + (tonumber(c[1]) or 0)
      counted.failed = counted.failed + (tonumber(c[2]) or 0)
      counted.cancelled = counted.cancelled + (tonumber(c[3]) or 0)
      counted.retried = counted.retried + (tonumber(c[4]) or 0)
    end
  end
  local open = redis.call('HGETALL', sk .. ':open')
  for i = 1, #open, 2 do
    local c = string.sub(open[i + 1], 1, 1)
    if c == 'q' or c == 'e' then unsend(sk, n, open[i]) end
  end
end
local totals = string.sub(INDEX, 1, #INDEX - #'groups') .. 'totals'
for field, k in pairs(counted) do
  if k > 0 then redis.call('HINCRBY', totals, field, k) end
end
drop_group()
redis.call('PUBLISH', IDBASE .. 'finished', cjson.encode({group_id = string.match(G, '{(.*)}'), outcome = 'deleted'}))
return 1
