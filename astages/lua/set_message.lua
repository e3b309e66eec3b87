-- Set the status message of job ARGV[7] of stage ARGV[6] to ARGV[8].
-- Returns 1, or 0 when the job does not exist (nothing is written).
local sk = stage_key(ARGV[6])
local seq = ARGV[7]
if redis.call('HEXISTS', sk .. ':open', seq) == 0 and redis.call('HEXISTS', sk .. ':done', seq) == 0 then
  return 0
end
redis.call('HSET', sk .. ':msg', seq, ARGV[8])
-- A group with a TTL (ttl=, or ended and kept): a message set since goes with it.
follow_ttl(sk .. ':msg')
return 1
