-- Register a callback job: ARGV[6] event (complete, success, failure, stage.<n>),
-- ARGV[7] its job spec, ARGV[8] (optional, stage events only) '+<name>' to make the
-- stage when the group has none by that number (as ensure_stage.lua does; an empty
-- <name> leaves the name, any other sets it). A failure callback registered after the group's first failure
-- fires at once. Returns the callback's field "<event>:<k>", or 'GROUP_GONE',
-- 'GROUP_FINISHED', 'STAGE_GONE', 'STAGE_COMPLETE', 'BAD_SPEC:<why>' (a spec no script
-- could send; nothing is written).
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
local usable, why = spec_head(ARGV[7])
if not usable then return 'BAD_SPEC:' .. why end
if group_final() then return 'GROUP_FINISHED' end
local ev = ARGV[6]
local n = string.match(ev, '^stage%.(.+)$')
if n then
  local st = redis.call('HGET', stage_key(n), 'status')
  if st == 'complete' or st == 'cancelled' then return 'STAGE_COMPLETE' end
  local make = ARGV[8] or ''
  if string.sub(make, 1, 1) == '+' then st = make_stage(n, string.sub(make, 2)) end
  if not st then return 'STAGE_GONE' end
end
local field = ev .. ':' .. redis.call('HINCRBY', G, 'cbseq', 1)
redis.call('HSET', G .. ':callbacks', field, ARGV[7])
follow_ttl(G .. ':callbacks')
if ev == 'failure' and redis.call('HEXISTS', G, 'failed_once') == 1 then
  local now = now_ms()
  keep_summary('failure', summary('running', now))
  write_arq_job(ARGV[7], IDBASE .. 'cb:' .. field, now)  -- usable: checked above
end
return field
