-- Set the flow limits (see top_up in _lib.lua) of the group (ARGV[6] = '') or of stage
-- ARGV[6]. Each value is '-' to leave it as it is, '' to remove it, else the new value:
--   ARGV[7]  max_in_flight (jobs)       ARGV[8]  rate: ms between two jobs
--   ARGV[9]  the rate as given ("50/s")
--   ARGV[10] priority (group only: seconds of head start)
--   ARGV[11] window (group only: jobs; 0 for none; '' for the default)
-- A new rate keeps the spacing from the last job sent (its next slot moves by the
-- difference of the intervals). A running group is moved on at once (a raised limit
-- sends more jobs now).
-- Returns {outcome, stage, jobs still to send} or 'GROUP_GONE', 'GROUP_FINISHED',
-- 'STAGE_GONE'.
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
if group_final() then return 'GROUP_FINISHED' end
local key = G
if (ARGV[6] or '') ~= '' then
  key = stage_key(ARGV[6])
  if redis.call('EXISTS', key) == 0 then return 'STAGE_GONE' end
end
local function put(field, value)
  if value == '-' or value == nil then return end
  if value == '' then redis.call('HDEL', key, field) else redis.call('HSET', key, field, value) end
end
put('max_in_flight', ARGV[7])
-- A cap lowered under the jobs in flight now: nothing more is sent until they drain below
-- it, and Cleaner.check allows up to that many meanwhile (drain: the count at lowering).
if (ARGV[7] or '-') ~= '-' then
  local cap, flying = tonumber(ARGV[7]), 0
  if key == G then
    for _, m in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
      if redis.call('HGET', stage_key(m), 'status') == 'running' then flying = flying + stage_in_flight(stage_key(m)) end
    end
  else
    flying = stage_in_flight(key)
  end
  if cap and flying > cap then redis.call('HSET', key, 'cap_drain', flying) else redis.call('HDEL', key, 'cap_drain') end
end
if (ARGV[8] or '-') ~= '-' then
  local old = tonumber(redis.call('HGET', key, 'rate_iv'))
  local nxt = tonumber(redis.call('HGET', key, 'rate_next'))
  local new = tonumber(ARGV[8])
  if new and old and nxt then
    redis.call('HSET', key, 'rate_next', tostring(nxt - old + new))
  elseif not new then
    redis.call('HDEL', key, 'rate_next')
  end
  put('rate_iv', ARGV[8])
  put('rate', ARGV[8] == '' and '' or ARGV[9])
end
if key == G then
  put('priority', ARGV[10])
  put('window', ARGV[11])
end
if redis.call('HGET', G, 'status') ~= 'running' then return {'pending', '', 0} end
return advance(now_ms())
