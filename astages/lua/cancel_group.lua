-- Cancel the group: every job not yet final is cancelled (jobs not started leave
-- arq's queue; running ones are asked to abort through arq's abort set),
-- later stages never start, the group ends as cancelled and its callbacks fire once.
-- Returns {outcome, stage, jobs still to send} ('finished' when it ended now or
-- before) or 'GROUP_GONE'.
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
if group_final() then return {'finished', '', 0} end
return stop_group(now_ms(), 'cancelled')
