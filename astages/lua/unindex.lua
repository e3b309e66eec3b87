-- Drop the group from the index of live groups when its hash is gone (a group kept with
-- keep_for, or made with ttl=, whose keys expired: nothing else removes its entry).
-- Returns 1 when it was dropped, 0 when the group exists or was not indexed.
if redis.call('EXISTS', G) == 1 then return 0 end
return redis.call('ZREM', INDEX, string.match(G, '{(.*)}'))
