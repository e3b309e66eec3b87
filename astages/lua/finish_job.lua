-- Report the outcome of try ARGV[8] of job ARGV[7] of stage ARGV[6]:
-- ARGV[9] is 's' (successful), 'f' (failed, ARGV[10] the error) or 'e' (will be re-run);
-- in capitals, a run that was never marked running (see finish_one's unmarked).
-- Returns {outcome, stage, jobs still to send}: see finish_one.
local plain = string.lower(ARGV[9])
local reply = finish_one(ARGV[6], ARGV[7], tonumber(ARGV[8]), plain, ARGV[10], plain ~= ARGV[9])
flush_counts()
return reply
