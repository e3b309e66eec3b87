-- Retry failed jobs of stage ARGV[6]: job ARGV[7] (a seq), or every failed job of the
-- stage when ARGV[7] is '*'. A retry is allowed while the job's stage runs (a failed job
-- of a running stage whose other jobs are still open) and its group has not ended; the
-- job goes back to queued and to arq under the same id: a new arq record and queue entry,
-- due now, arq's kept result and try counter for that id cleared (arq runs it as a new
-- job, from try 1 with its full max_tries), its error dropped, the counters moved, and a
-- job event written (from failed to queued, 'retry' 1, 'try' its failed try).
-- Returns, for one job: 'retried', or why not: 'gone' (no group), 'job_gone',
-- 'stage_gone', 'group_ended', 'stage:<status>' (its stage does not run),
-- 'not_failed:<status>', 'busy' (arq is still writing the end of its failed try),
-- 'bad_spec:<why>', 'capped:stage' / 'capped:group' (its stage's or group's
-- max_in_flight is reached: a retry never goes past a cap; it passes the window and the
-- rate, as job.enqueue_job() does). For '*': {'retried', jobs retried, jobs left failed
-- (busy, bad spec, or a cap reached: the rest), the cap reached or ''}, or one of the
-- stage-wide reasons.
if redis.call('EXISTS', G) == 0 then return 'gone' end
if group_final() then return 'group_ended' end
local n, which = ARGV[6], ARGV[7]
local sk = stage_key(n)
local st = redis.call('HGET', sk, 'status')
if not st then return 'stage_gone' end
if st ~= 'running' then return 'stage:' .. st end
local now = now_ms()
local ARQ_PREFIX = string.sub(ARQ_JOB, 1, #ARQ_JOB - 4)  -- "arq:job:" -> "arq:"
local stage_cap = tonumber(redis.call('HGET', sk, 'max_in_flight'))
local g_room = group_room()

local function retry_one(seq)
  local fin = redis.call('HGET', sk .. ':done', seq)
  if not fin then
    local cur = redis.call('HGET', sk .. ':open', seq)
    if not cur then return 'job_gone' end
    return 'not_failed:' .. STATUS[string.sub(cur, 1, 1)]
  end
  if string.sub(fin, 1, 1) ~= 'f' then return 'not_failed:' .. STATUS[string.sub(fin, 1, 1)] end
  local id = job_id(n, seq)
  -- arq's end of the failed try (result, clean-up) is written after astages' report:
  -- until it is, a new record would be removed by it.
  if redis.call('EXISTS', ARQ_IN_PROGRESS .. id) == 1 then return 'busy' end
  if stage_cap and stage_in_flight(sk) >= stage_cap then return 'capped:stage' end
  if g_room and g_room <= 0 then return 'capped:group' end
  local queue, why = write_arq_record(redis.call('HGET', sk .. ':spec', seq), id, now)
  if not queue then return 'bad_spec:' .. why end
  redis.call('ZADD', queue, int(due(now)), id)
  redis.call('DEL', ARQ_PREFIX .. 'result:' .. id, ARQ_PREFIX .. 'retry:' .. id)
  redis.call('HDEL', sk .. ':done', seq)
  redis.call('HDEL', sk .. ':err', seq)
  redis.call('HSET', sk .. ':open', seq, 'q')
  follow_ttl(sk .. ':open')
  count(sk, fin, 'q')
  redis.call('HINCRBY', sk, 'retried', 1)
  event({'job', n .. ':' .. seq, 'from', 'failed', 'to', 'queued', 'try', try_of(fin), 'retry', 1})
  if g_room then g_room = g_room - 1 end
  return 'retried'
end

if which ~= '*' then return retry_one(which) end
local retried, left, capped = 0, 0, ''
for _, seq in ipairs(redis.call('HKEYS', sk .. ':err')) do
  local outcome = capped ~= '' and capped or retry_one(seq)
  if outcome == 'retried' then
    retried = retried + 1
  elseif outcome == 'busy' or string.sub(outcome, 1, 8) == 'bad_spec' then
    left = left + 1
  elseif string.sub(outcome, 1, 7) == 'capped:' then
    capped, left = outcome, left + 1
  end
end
return {'retried', retried, left, capped}
