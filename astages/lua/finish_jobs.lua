-- Reports of several jobs of the group at once, after marks of runs still under way
-- (one argument per job: a worker sends many, and each argument costs it to encode).
-- ARGV[6] is how many marks, then "stage:seq:try" per mark: start_job.lua's transition of
-- a first try a worker ran without waiting for it (astages/worker.py), each one's
-- verdict ignored. Then how many reports, then "stage:seq:try:outcome" per job, followed
-- by the error when the outcome is a failure: each is finish_job.lua's transition,
-- applied in order; an outcome in capitals ('S', 'F', 'E') is a run that was never
-- marked (see finish_one's unmarked). Returns each report's {outcome, stage, jobs still
-- to send} (see finish_one), in the same order; a stage is topped up once, after its
-- last report (see flush_refills), and that report's reply tells what the top-up did.
local marks = tonumber(ARGV[6])
for i = 1, marks do
  local n, seq, try = string.match(ARGV[6 + i], '^(-?%d+):(%d+):(%d+)$')
  if not n then error('finish_jobs: not a mark: ' .. ARGV[6 + i]) end
  batch_step(start_one(n, seq, tonumber(try)))
end
local at = 7 + marks
local out = {}
defer_refills()
for i = 1, tonumber(ARGV[at]) do
  at = at + 1
  local n, seq, try, outcome = string.match(ARGV[at], '^(-?%d+):(%d+):(%d+):(%a)$')
  if not n then error('finish_jobs: not a report: ' .. ARGV[at]) end
  local err = ''
  if outcome == 'f' or outcome == 'F' then
    at = at + 1
    err = ARGV[at]
  end
  local plain = string.lower(outcome)
  local reply = finish_one(n, seq, tonumber(try), plain, err, plain ~= outcome)
  batch_step(reply)
  batch_reply(out, i, n, reply)
end
flush_refills(script_now(), out)
flush_counts()
return out
