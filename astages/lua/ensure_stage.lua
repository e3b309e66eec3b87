-- Get or create stage ARGV[6] of the group; ARGV[7] its name ('' or absent: leave the
-- name as it is; else the stage gets it, made or renamed).
-- Returns the stage's status, or the error code 'GROUP_GONE' or 'GROUP_FINISHED' (an
-- ended group takes no new or renamed stage).
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
local st = make_stage(ARGV[6], ARGV[7] or '')
if not st then return 'GROUP_FINISHED' end
return st
