-- Shared helpers, prepended to every astages script by astages/_scripts.py.
--
-- Every script gets the same leading arguments:
--   KEYS[1]  the group's hash, "<prefix>:{<group id>}"; every other key of the group is
--            derived from it and shares its hash tag (one cluster slot per group)
--   KEYS[2]  the global index of groups, "<prefix>:groups" (sorted set, score = created ms)
--   ARGV[1]  job id base, "<prefix>:<group id>:"; a staged job's arq id is base..n..':'..seq
--   ARGV[2]  arq's job key prefix ("arq:job:")
--   ARGV[3]  arq's expires_extra_ms (how long an unsent job record lives after its score)
--   ARGV[4]  how many jobs one call may hand to arq (initiation is sent in chunks)
-- Script specific arguments start at ARGV[5].
--
-- Layout of a group (G = KEYS[1]):
--   G               hash   description, created, status, initiated, finished
--   G:stages        zset   stage number -> stage number (ascending run order)
--   G:s:<n>         hash   number, status, created, started, finished, seq, cursor,
--                          and one counter per job status (O(1) progress), retried
--   G:s:<n>:jobs    list   job seq numbers in enqueue order
--   G:s:<n>:spec    hash   seq -> "<kind><ms>|<expires>|<queue length>|<queue><arq payload>"
--   G:s:<n>:open    hash   seq -> status of every job not final: p, q, r<try>, e<try>
--   G:s:<n>:done    hash   seq -> final status: s<try>, f<try>
--   G:s:<n>:msg     hash   seq -> status message (only jobs that set one)
--   G:s:<n>:err     hash   seq -> error of a failed job
-- A job is in exactly one of :open and :done. Completion is counted by HDEL from :open
-- (returns 1 once), so duplicated or stale reports change nothing.

local G = KEYS[1]
local INDEX = KEYS[2]
local IDBASE = ARGV[1]
local ARQ_JOB = ARGV[2]
local EXPIRES_EXTRA = tonumber(ARGV[3])
local SEND_LIMIT = tonumber(ARGV[4])

local COUNTER = {
  p = 'pending', q = 'queued', r = 'running', e = 'pending_re_run',
  s = 'successful', f = 'failed',
}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function stage_key(n)
  return G .. ':s:' .. n
end

-- Move one job between status counters of stage hash sk (from or to may be nil).
local function count(sk, from, to)
  if from then redis.call('HINCRBY', sk, COUNTER[string.sub(from, 1, 1)], -1) end
  if to then redis.call('HINCRBY', sk, COUNTER[string.sub(to, 1, 1)], 1) end
end

-- The try number carried by an open or done status ("r3" -> 3), 0 when none.
local function try_of(code)
  return tonumber(string.sub(code, 2)) or 0
end

-- Split a job spec into its schedule, expiry, queue and arq payload.
local function parse_spec(spec)
  local p1 = string.find(spec, '|', 1, true)
  local p2 = string.find(spec, '|', p1 + 1, true)
  local p3 = string.find(spec, '|', p2 + 1, true)
  local kind = string.sub(spec, 1, 1)
  local when = tonumber(string.sub(spec, 2, p1 - 1))
  local expires = tonumber(string.sub(spec, p1 + 1, p2 - 1))
  local qlen = tonumber(string.sub(spec, p2 + 1, p3 - 1))
  local queue = string.sub(spec, p3 + 1, p3 + qlen)
  local payload = string.sub(spec, p3 + qlen + 1)
  return kind, when, expires, queue, payload
end

-- Write arq's own job record and queue entry for job seq of stage n (what
-- ArqRedis.enqueue_job does, minus its round trips). An "in" delay counts from now.
local function send(sk, n, seq, now)
  local kind, when, expires, queue, payload = parse_spec(redis.call('HGET', sk .. ':spec', seq))
  local score = now
  if kind == 'a' then score = when elseif kind == 'i' then score = now + when end
  local ttl = expires
  if ttl <= 0 then ttl = score - now + EXPIRES_EXTRA end
  if ttl < 1 then ttl = 1 end
  local job_id = IDBASE .. n .. ':' .. seq
  redis.call('SET', ARQ_JOB .. job_id, payload, 'PX', ttl)
  redis.call('ZADD', queue, score, job_id)
  redis.call('HSET', sk .. ':open', seq, 'q')
  count(sk, 'p', 'q')
end

-- Take job seq of stage n out of arq's queue (it has not started, or waits for a retry).
local function unsend(sk, n, seq)
  local spec = redis.call('HGET', sk .. ':spec', seq)
  if not spec then return end
  local _, _, _, queue, _ = parse_spec(spec)
  local job_id = IDBASE .. n .. ':' .. seq
  redis.call('ZREM', queue, job_id)
  redis.call('DEL', ARQ_JOB .. job_id)
end

-- Hand the next chunk of pending jobs of running stage n to arq, in enqueue order.
-- Returns the number of jobs that still wait for a later chunk.
local function send_chunk(n, now, budget)
  local sk = stage_key(n)
  local cursor = tonumber(redis.call('HGET', sk, 'cursor') or '0')
  local total = redis.call('LLEN', sk .. ':jobs')
  if cursor >= total then return 0, budget end
  local last = cursor + budget - 1
  local seqs = redis.call('LRANGE', sk .. ':jobs', cursor, last)
  for _, seq in ipairs(seqs) do
    if redis.call('HGET', sk .. ':open', seq) == 'p' then send(sk, n, seq, now) end
  end
  cursor = cursor + #seqs
  redis.call('HSET', sk, 'cursor', cursor)
  return total - cursor, budget - #seqs
end

local function complete_stage(n, now)
  redis.call('HSET', stage_key(n), 'status', 'complete', 'finished', now)
end

local function delete_stage_keys(n)
  local sk = stage_key(n)
  redis.call('UNLINK', sk, sk .. ':jobs', sk .. ':spec', sk .. ':open', sk .. ':done',
    sk .. ':msg', sk .. ':err')
end

local function finish_group(now)
  for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do delete_stage_keys(n) end
  redis.call('UNLINK', G, G .. ':stages')
  redis.call('ZREM', INDEX, string.match(G, '{(.*)}'))
end

-- Move the group on: keep sending the running stage(s); when none runs, start the
-- lowest pending stage (an empty one completes at once and the next is tried); when
-- every stage is complete the group finishes and its keys are deleted.
-- Returns {outcome, stage, jobs still to send}: outcome is 'running' or 'finished'.
local function advance(now)
  local budget = SEND_LIMIT
  while true do
    local running, first_pending = {}, nil
    for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
      local st = redis.call('HGET', stage_key(n), 'status')
      if st == 'running' then
        running[#running + 1] = n
      elseif st == 'pending' and first_pending == nil then
        first_pending = n
      end
    end
    if #running > 0 then
      local left = 0
      for _, n in ipairs(running) do
        local l
        l, budget = send_chunk(n, now, budget)
        left = left + l
      end
      return {'running', running[1], left}
    end
    if first_pending == nil then
      finish_group(now)
      return {'finished', '', 0}
    end
    local sk = stage_key(first_pending)
    redis.call('HSET', sk, 'status', 'running', 'started', now)
    local left
    left, budget = send_chunk(first_pending, now, budget)
    if left > 0 or redis.call('HLEN', sk .. ':open') > 0 then
      return {'running', first_pending, left}
    end
    complete_stage(first_pending, now)
  end
end

-- After a job of stage n left :open: complete the stage when it was the last open
-- job of a running stage, then move the group on.
local function after_job_left(n, now)
  local sk = stage_key(n)
  if redis.call('HGET', sk, 'status') ~= 'running' then return {'open', n, 0} end
  if redis.call('HLEN', sk .. ':open') > 0 then return {'open', n, 0} end
  complete_stage(n, now)
  if redis.call('HGET', G, 'status') ~= 'running' then return {'complete', n, 0} end
  return advance(now)
end
