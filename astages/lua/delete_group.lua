-- Delete the group, its stages and jobs; jobs not yet started leave arq's queue and
-- waiters are told. No callback fires. Returns 1, or 0 when there was no such group
-- (its index entry is dropped anyway).
if redis.call('EXISTS', G) == 0 then
  redis.call('ZREM', INDEX, string.match(G, '{(.*)}'))
  return 0
end
for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
  local sk = stage_key(n)
  local open = redis.call('HGETALL', sk .. ':open')
  for i = 1, #open, 2 do
    local c = string.sub(open[i + 1], 1, 1)
    if c == 'q' or c == 'e' then unsend(sk, n, open[i]) end
  end
end
drop_group()
redis.call('PUBLISH', IDBASE .. 'finished', cjson.encode({group_id = string.match(G, '{(.*)}'), outcome = 'deleted'}))
return 1
