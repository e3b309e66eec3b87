-- Report the outcome of try ARGV[8] of job ARGV[7] of stage ARGV[6]:
-- ARGV[9] is 's' (successful), 'f' (failed, ARGV[10] the error) or 'e' (will be re-run).
-- Returns {outcome, stage, jobs still to send}: see finish_one.
local reply = finish_one(ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10])
flush_counts()
return reply
