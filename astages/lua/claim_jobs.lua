-- astages worker takes staged jobs of the group from arq's queue (its lean path): for
-- each job what arq's worker does to take one (its in-progress mark, unless another
-- worker has one or the job is not due; its payload; its retry counter; its abort
-- request) and start_job.lua's transition, in one call.
--   ARGV[6]  arq's queue          ARGV[7]  the worker's clock (ms): due when score <= it
--   ARGV[8]  the mark's life (ms) ARGV[9]  '1' when the worker aborts jobs (allow_abort_jobs)
--   ARGV[10] how many jobs, then (arq job id, stage, seq, in-progress mark) per job
-- Returns per job, in order: false (not taken: running elsewhere, gone from the queue or
-- not due) or {score, payload or false, try, aborted (0/1), verdict}; the verdict is
-- start_one's ('run', 'final', 'gone'), or '' when the job is not to run (no payload, or
-- aborted: the worker fails it as arq does).
local ARQ_RETRY = string.sub(ARQ_JOB, 1, #ARQ_JOB - 4) .. 'retry:'
local queue, now, life, abortable = ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[9] == '1'
local out = {}
for i = 1, tonumber(ARGV[10]) do
  local at = 10 + (i - 1) * 4
  local id = ARGV[at + 1]
  local score = redis.call('ZSCORE', queue, id)
  if not score or tonumber(score) == 0 or tonumber(score) > now
    or not redis.call('SET', ARQ_IN_PROGRESS .. id, ARGV[at + 4], 'PX', life, 'NX') then
    out[i] = false  -- the mark is written only if no other worker has one (NX)
  else
    local payload = redis.call('GET', ARQ_JOB .. id)
    local try = redis.call('INCR', ARQ_RETRY .. id)
    redis.call('EXPIRE', ARQ_RETRY .. id, 88400)
    local aborted = 0
    if abortable then aborted = redis.call('ZREM', ARQ_ABORT, id) end
    local verdict = ''
    if payload and aborted == 0 then
      verdict = start_one(ARGV[at + 2], ARGV[at + 3], try)
      batch_step(verdict)
    end
    out[i] = {score, payload or false, try, aborted, verdict}
  end
end
flush_counts()
return out
