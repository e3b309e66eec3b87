-- astages worker ends runs of staged jobs of the group (its lean path): for each, what
-- arq's worker writes after a run (the in-progress mark deleted; a finished job's
-- result kept, its retry counter and record deleted and the job taken off the queue
-- and the abort set; a re-run one's score moved by the retry delay) and, when the run
-- has an outcome to report, finish_job.lua's transition, in one call.
--   ARGV[6]  arq's queue   ARGV[7]  how many jobs, then per job:
--   (arq job id, stage, seq, try, finished '1'/'0', result ('' for none), result life ms
--    ('' to keep it forever), score increment ('' for none), outcome ('' for none: it is
--    settled after the job), error)
-- Returns per job, in order: finish_one's {outcome, stage, jobs still to send}, or
-- {'', '', 0} when there was nothing to report. A stage is topped up once, after its
-- last report (see flush_refills): that report's reply tells what the top-up did.
local ARQ_RETRY = string.sub(ARQ_JOB, 1, #ARQ_JOB - 4) .. 'retry:'
local ARQ_RESULT = string.sub(ARQ_JOB, 1, #ARQ_JOB - 4) .. 'result:'
local queue = ARGV[6]
-- Whether arq's abort set exists, read once (and again after a transition that moved the
-- group on: stopping it asks arq to abort running jobs): ZREM from a missing set does nothing.
local aborts = nil
local out = {}
defer_refills()
for i = 1, tonumber(ARGV[7]) do
  local at = 7 + (i - 1) * 10
  local id = ARGV[at + 1]
  if ARGV[at + 5] == '1' then
    if ARGV[at + 6] ~= '' then
      if ARGV[at + 7] == '' then
        redis.call('SET', ARQ_RESULT .. id, ARGV[at + 6])
      else
        redis.call('SET', ARQ_RESULT .. id, ARGV[at + 6], 'PX', ARGV[at + 7])
      end
    end
    redis.call('DEL', ARQ_IN_PROGRESS .. id, ARQ_RETRY .. id, ARQ_JOB .. id)
    if aborts == nil then aborts = redis.call('EXISTS', ARQ_ABORT) == 1 end
    if aborts then redis.call('ZREM', ARQ_ABORT, id) end
    redis.call('ZREM', queue, id)
  else
    redis.call('DEL', ARQ_IN_PROGRESS .. id)
    if ARGV[at + 8] ~= '' then redis.call('ZINCRBY', queue, ARGV[at + 8], id) end
  end
  local reply = {'', '', 0}
  if ARGV[at + 9] ~= '' then
    reply = finish_one(ARGV[at + 2], ARGV[at + 3], tonumber(ARGV[at + 4]), ARGV[at + 9], ARGV[at + 10])
    if batch_step(reply) then aborts = nil end
  end
  batch_reply(out, i, ARGV[at + 2], reply)
end
flush_refills(script_now(), out)
flush_counts()
return out
