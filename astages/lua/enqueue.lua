-- Record jobs in stage ARGV[6]; ARGV[7] is '+<name>' to make the stage when the group
-- has none by that number (as ensure_stage.lua does; an empty <name> leaves the name, any
-- other sets it), else the stage must exist (any other value, e.g. a token, is not read:
-- a call re-sent after its reply was lost is answered by once(), _lib.lua), ARGV[8] the seq of
-- the first job when reserved beforehand (reserve.lua; '' to take new ones here),
-- ARGV[9..] are the jobs' specs (see _lib.lua). A pending stage only records them; a running stage hands
-- them to arq through its window (at once when it has room, see top_up in _lib.lua).
-- Returns {first seq, 1 if the stage runs (sent through its window) else 0} or an error code:
-- 'GROUP_GONE', 'GROUP_FINISHED', 'STAGE_GONE', 'STAGE_COMPLETE', 'STAGE_CANCELLED', or
-- 'BAD_SPEC:<i>:<why>' when the i-th spec (from 1) is one no script could send (nothing
-- is written: every spec is checked before the first write).
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
local n = ARGV[6]
local sk = stage_key(n)
local st = redis.call('HGET', sk, 'status')
local make = string.sub(ARGV[7], 1, 1) == '+'
if not st and not make then return 'STAGE_GONE' end
if st == 'complete' then return 'STAGE_COMPLETE' end
if st == 'cancelled' then return 'STAGE_CANCELLED' end
local count_new = #ARGV - 8
if count_new < 1 then return {0, 0} end
for i = 1, count_new do
  local usable, why = spec_head(ARGV[8 + i])
  if not usable then return 'BAD_SPEC:' .. i .. ':' .. why end
end
if make then  -- made (or named) only now: a call that records nothing makes nothing
  st = make_stage(n, string.sub(ARGV[7], 2))
  if not st then return 'GROUP_FINISHED' end
end
local first = tonumber(ARGV[8])
-- Reserved seqs written already (a buffer's write repeated after it failed on a lost
-- reply): the jobs are there, record nothing more.
if first and redis.call('HEXISTS', sk .. ':spec', first) == 1 then
  return {first, st == 'running' and 1 or 0}
end
if not first then first = redis.call('HINCRBY', sk, 'seq', count_new) - count_new + 1 end
local seqs, specs, opens = {}, {}, {}
for i = 1, count_new do
  local seq = first + i - 1
  seqs[#seqs + 1] = seq
  specs[#specs + 1] = seq
  specs[#specs + 1] = ARGV[8 + i]
  opens[#opens + 1] = seq
  opens[#opens + 1] = 'p'
end
redis.call('RPUSH', sk .. ':jobs', unpack(seqs))
redis.call('HSET', sk .. ':spec', unpack(specs))
redis.call('HSET', sk .. ':open', unpack(opens))
redis.call('HINCRBY', sk, 'pending', count_new)
follow_ttl(sk .. ':jobs', sk .. ':spec', sk .. ':open')
if st ~= 'running' then return {first, 0} end
-- A running stage sends them through its window (top_up): at once when it has room,
-- else as jobs ahead of them leave flight. Every spec is usable (checked above).
top_up(n, now_ms(), math.max(SEND_LIMIT, count_new), group_room())
return {first, 1}
