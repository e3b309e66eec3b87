-- Reserve ARGV[7] seqs in stage ARGV[6] for jobs recorded later with those seqs (the
-- buffer of within_a_grouping). Returns the last seq reserved, or 'GROUP_GONE',
-- 'STAGE_GONE', 'STAGE_COMPLETE', 'STAGE_CANCELLED'.
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
local sk = stage_key(ARGV[6])
local st = redis.call('HGET', sk, 'status')
if not st then return 'STAGE_GONE' end
if st == 'complete' then return 'STAGE_COMPLETE' end
if st == 'cancelled' then return 'STAGE_CANCELLED' end
return redis.call('HINCRBY', sk, 'seq', tonumber(ARGV[7]))
