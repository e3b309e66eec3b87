-- A worker picked up try ARGV[8] of job ARGV[7] of stage ARGV[6].
-- Returns 'run' (now running), or why it must not run: 'gone' (no such job, stage or
-- group) or 'final' (it finished already; arq re-delivered it).
if redis.call('EXISTS', G) == 0 then return 'gone' end
local n, seq, try = ARGV[6], ARGV[7], tonumber(ARGV[8])
local sk = stage_key(n)
if redis.call('HEXISTS', sk .. ':done', seq) == 1 then return 'final' end
local cur = redis.call('HGET', sk .. ':open', seq)
if not cur then return 'gone' end
local code = 'r' .. try
if cur ~= code then
  redis.call('HSET', sk .. ':open', seq, code)
  count(sk, cur, code)
  event({'job', n .. ':' .. seq, 'from', STATUS[string.sub(cur, 1, 1)], 'to', 'running', 'try', try})
end
return 'run'
