-- Get or create stage ARGV[6] of the group.
-- Returns the stage's status, or the error code 'GROUP_GONE' or 'GROUP_FINISHED'.
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
local n = ARGV[6]
local sk = stage_key(n)
local st = redis.call('HGET', sk, 'status')
if st then return st end
if group_final() then return 'GROUP_FINISHED' end
redis.call('HSET', sk, 'number', n, 'status', 'pending', 'created', now_ms(),
  'seq', redis.call('HGET', G, 'seq:' .. n) or 0,
  'cursor', 0, 'pending', 0, 'queued', 0, 'running', 0, 'pending_re_run', 0,
  'successful', 0, 'failed', 0, 'cancelled', 0, 'retried', 0)
redis.call('ZADD', G .. ':stages', n, n)
follow_ttl(sk, G .. ':stages')
return 'pending'
