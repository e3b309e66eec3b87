-- Reports of several jobs of the group at once: ARGV[6] is how many, then
-- (stage, seq, try, outcome, error) per job. Each is finish_job.lua's transition, applied
-- in order; returns each one's {outcome, stage, jobs still to send}, in the same order.
local out = {}
for i = 1, tonumber(ARGV[6]) do
  local at = 6 + (i - 1) * 5
  local reply = finish_one(ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3]), ARGV[at + 4], ARGV[at + 5])
  batch_step(reply)
  out[i] = reply
end
flush_counts()
return out
