-- Create a group. ARGV[5] description, ARGV[6] created ms.
-- Returns 1, or 0 when a group with this id exists already.
if redis.call('EXISTS', G) == 1 then return 0 end
redis.call('HSET', G, 'description', ARGV[5], 'created', ARGV[6], 'status', 'pending')
redis.call('ZADD', INDEX, ARGV[6], string.match(G, '{(.*)}'))
return 1
