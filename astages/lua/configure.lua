-- Set the failure policy of the group (ARGV[6] = '') or of stage ARGV[6]:
-- ARGV[7] max_failed, ARGV[8] max_ratio (-1: no limit; '' on a stage: use the
-- group's). Returns 'ok' or 'GROUP_GONE', 'GROUP_FINISHED', 'STAGE_GONE'.
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
if group_final() then return 'GROUP_FINISHED' end
local key = G
if ARGV[6] ~= '' then
  key = stage_key(ARGV[6])
  if redis.call('EXISTS', key) == 0 then return 'STAGE_GONE' end
end
if ARGV[7] == '' then redis.call('HDEL', key, 'max_failed', 'max_ratio')
else redis.call('HSET', key, 'max_failed', ARGV[7], 'max_ratio', ARGV[8]) end
return 'ok'
