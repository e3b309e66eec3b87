-- Hand the next chunk of a big stage's pending jobs to arq (whoever started the
-- stage calls this until nothing is left; the sweeper resumes it after a crash).
-- Returns {outcome, stage, jobs still to send} or 'GROUP_GONE'.
if redis.call('EXISTS', G) == 0 then return 'GROUP_GONE' end
if redis.call('HGET', G, 'status') ~= 'running' then return {'pending', '', 0} end
return advance(now_ms())
