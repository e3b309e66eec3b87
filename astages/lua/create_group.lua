-- Create a group. ARGV[5] description, ARGV[6] created ms, ARGV[7] keep_for seconds,
-- ARGV[8] events cap, ARGV[9] max_failed, ARGV[10] max_ratio (-1: no limit), ARGV[11]
-- the safety deadline (epoch ms; '' for none): every key of a group that has not ended
-- by then expires (see follow_ttl).
-- Returns 1, or 0 when a group with this id exists already.
if redis.call('EXISTS', G) == 1 then return 0 end
redis.call('HSET', G, 'description', ARGV[5], 'created', ARGV[6], 'status', 'pending',
  'keep_for', ARGV[7] or 0, 'events', ARGV[8] or 0, 'max_failed', ARGV[9] or -1,
  'max_ratio', ARGV[10] or -1, 'cbseq', 0)
redis.call('ZADD', INDEX, ARGV[6], string.match(G, '{(.*)}'))
if ARGV[11] and ARGV[11] ~= '' then redis.call('PEXPIREAT', G, ARGV[11]) end
return 1
