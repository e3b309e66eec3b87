-- A worker picked up try ARGV[8] of job ARGV[7] of stage ARGV[6].
-- Returns 'run' (now running), or why it must not run: 'gone' (no such job, stage or
-- group) or 'final' (it finished already; arq re-delivered it). See start_one.
local verdict = start_one(ARGV[6], ARGV[7], tonumber(ARGV[8]))
flush_counts()
return verdict
