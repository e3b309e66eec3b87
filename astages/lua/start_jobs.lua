-- Workers picked up several jobs of the group at once: ARGV[6] is how many, then
-- (stage, seq, try) per job. Each is start_job.lua's transition, in order; returns the
-- verdict of each ('run', 'gone' or 'final'), in the same order.
local out = {}
for i = 1, tonumber(ARGV[6]) do
  local at = 6 + (i - 1) * 3
  local verdict = start_one(ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3]))
  batch_step(verdict)
  out[i] = verdict
end
flush_counts()
return out
