-- Set the status message of job ARGV[6] of stage ARGV[5] to ARGV[7].
-- Returns 1, or 0 when the job does not exist (nothing is written).
local sk = stage_key(ARGV[5])
local seq = ARGV[6]
if redis.call('HEXISTS', sk .. ':open', seq) == 0 and redis.call('HEXISTS', sk .. ':done', seq) == 0 then
  return 0
end
redis.call('HSET', sk .. ':msg', seq, ARGV[7])
-- An ended group kept with keep_for expires: a message set since goes with it.
local ttl = redis.call('PTTL', G)
if ttl > 0 then redis.call('PEXPIRE', sk .. ':msg', ttl) end
return 1
