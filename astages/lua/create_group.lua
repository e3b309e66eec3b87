-- Create a group. ARGV[6] description, ARGV[7] created ms, ARGV[8] keep_for seconds,
-- ARGV[9] events cap, ARGV[10] max_failed, ARGV[11] max_ratio (-1: no limit), ARGV[12]
-- the safety deadline (epoch ms; '' for none): every key of a group that has not ended
-- by then expires (see follow_ttl). ARGV[13..16] (optional, '' for none): the flow
-- limits max_in_flight, rate interval (ms), rate (as given), priority, ARGV[17] window
-- ('' for the default; see top_up), ARGV[18] (optional) the creating caller's span for
-- tracing, "<trace id>-<span id>-<flags>" ('' for none; see astages/tracing.py).
-- Returns 1, or 0 when a group with this id exists already.
if redis.call('EXISTS', G) == 1 then return 0 end
-- checked before any write: a deadline past the year 3000 is none Redis could refuse
local deadline = tonumber(ARGV[12] or '')
if deadline and deadline > MAX_TIME_MS then deadline = MAX_TIME_MS end
redis.call('HSET', G, 'description', ARGV[6], 'created', ARGV[7], 'status', 'pending',
  'keep_for', ARGV[8] or 0, 'events', ARGV[9] or 0, 'max_failed', ARGV[10] or -1,
  'max_ratio', ARGV[11] or -1, 'cbseq', 0)
redis.call('ZADD', INDEX, ARGV[7], string.match(G, '{(.*)}'))
local limits = {'max_in_flight', 'rate_iv', 'rate', 'priority', 'window'}
for i, field in ipairs(limits) do
  local v = ARGV[12 + i]
  if v and v ~= '' then redis.call('HSET', G, field, v) end
end
if ARGV[18] and ARGV[18] ~= '' then redis.call('HSET', G, 'trace', ARGV[18]) end
if deadline then redis.call('PEXPIREAT', G, int(deadline)) end
return 1
