-- Delete stage ARGV[6] and its jobs; jobs not yet started leave arq's queue. When the
-- group is running it moves on (a deleted running stage does not leave it stuck).
-- Returns {outcome, stage, jobs still to send}; outcome 'gone' when there was no
-- such stage.
if redis.call('EXISTS', G) == 0 then return {'gone', '', 0} end
local n = ARGV[6]
local sk = stage_key(n)
if redis.call('EXISTS', sk) == 0 then return {'gone', n, 0} end
local open = redis.call('HGETALL', sk .. ':open')
for i = 1, #open, 2 do
  local c = string.sub(open[i + 1], 1, 1)
  if c == 'q' or c == 'e' then unsend(sk, n, open[i]) end
end
-- Its job ids are arq's ids too: a stage made again under this number goes on from the
-- last seq, so no new job shares an id with an old one (arq's result, in-progress key
-- or a late report of the old job would be taken for the new job's).
redis.call('HSET', G, 'seq:' .. n, redis.call('HGET', sk, 'seq') or 0)
delete_stage_keys(n)
redis.call('ZREM', G .. ':stages', n)
-- Its callbacks go with it: a stage made again under this number is another stage, and
-- a callback that fired already would fire again, under the same arq id.
local mine = 'stage.' .. n .. ':'
for _, field in ipairs(redis.call('HKEYS', G .. ':callbacks')) do
  if string.sub(field, 1, #mine) == mine then redis.call('HDEL', G .. ':callbacks', field) end
end
if redis.call('HGET', G, 'status') ~= 'running' then return {'deleted', n, 0} end
return advance(now_ms())
