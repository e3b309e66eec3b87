-- Shared helpers, prepended to every astages script by astages/_scripts.py.
--
-- Every script gets the same leading arguments:
--   KEYS[1]  the group's hash, "<prefix>:{<group id>}"; every other key of the group is
--            derived from it and shares its hash tag (one cluster slot per group)
--   KEYS[2]  the global index of groups, "<prefix>:groups" (sorted set, score = created ms)
--   ARGV[1]  job id base, "<prefix>:<group id>:"; a staged job's arq id is job_id(n, seq)
--   ARGV[2]  arq's job key prefix ("arq:job:")
--   ARGV[3]  arq's expires_extra_ms (how long an unsent job record lives after its score)
--   ARGV[4]  how many jobs one call may hand to arq (initiation is sent in chunks)
--   ARGV[5]  the caller's clock (epoch ms; '' when unknown), see due()
-- Script specific arguments start at ARGV[6].
--
-- Layout of a group (G = KEYS[1]):
--   G               hash   description, created, status (pending, running, then complete,
--                          failed or cancelled), initiated, finished, keep_for, events
--                          (stream cap), max_failed / max_ratio (failure policy), cbseq,
--                          failed_once, summary (kept groups), seq:<n> (last job seq
--                          of a deleted stage n, so a stage made again reuses no job id);
--                          flow control (see top_up): window, max_in_flight, rate_iv,
--                          rate (as given), rate_next, priority
--   G:callbacks     hash   "<event>:<k>" -> job spec; event is complete, success, failure
--                          or stage.<n>
--   G:events        stream job and stage transitions, capped at the group's events cap
--   G:summary:<ev>  string JSON summary a callback of event <ev> receives (expires)
--   G:stages        zset   stage number -> stage number (ascending run order)
--   G:s:<n>         hash   number, status (pending, running, complete, cancelled), name
--                          (optional), created, started, finished, seq, cursor, max_failed /
--                          max_ratio, and one counter per job status (O(1)), retried
--   G:s:<n>:jobs    list   job seq numbers in enqueue order
--   G:s:<n>:spec    hash   seq -> "<kind><ms>|<expires>|<queue length>|<queue><arq payload>"
--                          (see spec_head for what a usable spec is)
--   G:s:<n>:open    hash   seq -> status of every job not final: p, q, r<try>, e<try>
--   G:s:<n>:done    hash   seq -> final status: s<try>, f<try>, c<try> (cancelled)
--   G:s:<n>:msg     hash   seq -> status message (only jobs that set one)
--   G:s:<n>:err     hash   seq -> error of a failed job
-- A job is in exactly one of :open and :done. Completion is counted by HDEL from :open
-- (returns 1 once), so duplicated or stale reports change nothing.
--
-- Global keys of the prefix P (KEYS[2] is P:groups; these are derived from it):
--   P:totals        hash   successful, failed, cancelled, retried: the jobs of every group
--                          that ended (finish_group) or was deleted while live
--                          (delete_group.lua), added once per group as it goes (O(1) per
--                          group, nothing per job). Jobs done so far = P:totals + the stage
--                          counters of the live groups (astages/ops.py)
--   P:series        stream samples "successful", "failed", "cancelled" of those cumulative
--                          counts, one per sweeper pass (astages/sweeper.py), capped with
--                          MAXLEN ~ 2880 (a day at the default 30 s interval)
-- Neither belongs to a group: the Cleaner's check and repair never look at them (they walk
-- P:{* and the index); purge_all deletes them with every other key of the prefix.

local G = KEYS[1]
local INDEX = KEYS[2]
local IDBASE = ARGV[1]
local ARQ_JOB = ARGV[2]
local EXPIRES_EXTRA = tonumber(ARGV[3])
local SEND_LIMIT = tonumber(ARGV[4])
local CALLER_NOW = tonumber(ARGV[5])
-- arq's set of jobs to abort, beside its job keys ("arq:job:" -> "arq:abort").
local ARQ_ABORT = string.sub(ARQ_JOB, 1, #ARQ_JOB - 4) .. 'abort'
-- ... and its in-progress marks ("arq:in-progress:<id>").
local ARQ_IN_PROGRESS = string.sub(ARQ_JOB, 1, #ARQ_JOB - 4) .. 'in-progress:'

local COUNTER = {
  p = 'pending', q = 'queued', r = 'running', e = 'pending_re_run',
  s = 'successful', f = 'failed', c = 'cancelled',
}
local STATUS = COUNTER
local FINAL_GROUP = {complete = true, failed = true, cancelled = true}
-- How long a callback's summary is kept for it to read (seconds), at least.
local SUMMARY_TTL = 86400
local MAX_FAILED_IDS = 1000
-- Bounds of the numbers in a job spec (astages/models.py has the same): a time between
-- epoch 0 and the year 3000, a delay or an expiry of at most 100 years. Within them every
-- score and TTL a script computes is a whole number Redis takes.
local MAX_TIME_MS = 32503680000000
local MAX_DELAY_MS = 3155760000000
-- Width a seq is zero-padded to in an arq job id (astages/_keys.py SEQ_WIDTH).
local SEQ_FORMAT = '%010d'

-- A whole number as a command argument: Lua writes numbers from about 1e14 on with an
-- exponent ('1e+14'), which Redis refuses as an integer.
local function int(x)
  return string.format('%d', x)
end

-- The arq job id of job seq of stage n: seq zero-padded, so the ids of a stage sort as
-- strings in enqueue order (arq takes jobs of equal score in the string order of their ids).
local function job_id(n, seq)
  local s = tonumber(seq)
  if not s then return IDBASE .. n .. ':' .. seq end
  return IDBASE .. n .. ':' .. string.format(SEQ_FORMAT, s)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The score of a job due now. arq takes a job when its score is not after the worker's own
-- clock, so a job scored with Redis' clock would wait for a worker whose clock is behind
-- Redis by the skew: it gets the earlier of Redis' clock and the caller's (the worker
-- whose report starts a stage, or the client that starts it).
local function due(now)
  if CALLER_NOW and CALLER_NOW < now then return CALLER_NOW end
  return now
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

local group_pttl = nil

-- Keys created under a group that has a TTL (made with ttl=, or ended and kept with
-- keep_for) expire with the group: a script passes every key it may have created.
local function follow_ttl(...)
  if group_pttl == nil then group_pttl = redis.call('PTTL', G) end
  if group_pttl > 0 then
    for _, k in ipairs({...}) do redis.call('PEXPIRE', k, int(group_pttl)) end
  end
end

-- What after_job_left read of a stage for the reports of one call (a batch's reports of
-- one stage share it), by stage hash: its status, that nothing waits behind its cursor
-- (drained) and how many of its jobs are open. finish_one keeps the count as it removes
-- jobs from :open; whatever else changes a stage (its status, :open, its cursor) forgets
-- it all (forget()), as does a transition that moved the group on (batch_step).
local memo_status, memo_drained, memo_open = {}, {}, {}
local function forget()
  memo_status, memo_drained, memo_open = {}, {}, {}
end

-- Counter moves of the starts and reports of one call, written once per stage and counter
-- (flush_counts: every script that starts or reports jobs calls it last, and a report
-- calls it before anything that reads a counter: see finish_one and after_job_left).
local later = {}
local function count_later(sk, from, to)
  local c = later[sk]
  if not c then
    c = {}
    later[sk] = c
  end
  local f, t = COUNTER[string.sub(from, 1, 1)], COUNTER[string.sub(to, 1, 1)]
  c[f] = (c[f] or 0) - 1
  c[t] = (c[t] or 0) + 1
end

local function flush_counts()
  for sk, c in pairs(later) do
    for field, d in pairs(c) do
      if d ~= 0 then redis.call('HINCRBY', sk, field, d) end
    end
  end
  later = {}
end

local events_cap = nil
-- Caps on a group's own numbers as scripts use them (a stored value past them, planted or
-- from another version, is taken as the cap: Redis refuses some of them outright).
local MAX_EVENTS = 1e12
local MAX_KEEP_S = MAX_DELAY_MS / 1000

-- The group's keep_for in seconds (0: not kept), at most 100 years.
local function keep_for()
  local keep = tonumber(redis.call('HGET', G, 'keep_for') or '0') or 0
  if keep ~= keep or keep < 0 then return 0 end  -- NaN or negative: not kept
  return math.min(math.ceil(keep), MAX_KEEP_S)
end

-- Append a transition to the group's capped event stream (fields: a flat list).
local function event(fields)
  if events_cap == nil then
    events_cap = math.min(tonumber(redis.call('HGET', G, 'events') or '0') or 0, MAX_EVENTS)
  end
  if events_cap > 0 then
    if fields[1] == 'stage' then  -- a stage's event carries its name, when it has one
      local name = redis.call('HGET', stage_key(fields[2]), 'name')
      if name then
        fields[#fields + 1] = 'name'
        fields[#fields + 1] = name
      end
    end
    redis.call('XADD', G .. ':events', 'MAXLEN', '~', int(events_cap), '*', unpack(fields))
    follow_ttl(G .. ':events')
  end
end

local function group_final()
  return FINAL_GROUP[redis.call('HGET', G, 'status') or ''] == true
end

-- Stage n's status; when the group has no stage by that number, it is made first
-- (pending, empty). name: '' leaves the stage's name as it is, else the stage gets it
-- (made or renamed). Returns nil when the group has ended and the stage would be made or
-- renamed (an ended group takes no changes).
local function make_stage(n, name)
  local sk = stage_key(n)
  local st = redis.call('HGET', sk, 'status')
  local renamed = name ~= '' and redis.call('HGET', sk, 'name') ~= name
  if st and not renamed then return st end
  if group_final() then return nil end
  if not st then
    redis.call('HSET', sk, 'number', n, 'status', 'pending', 'created', now_ms(),
      'seq', redis.call('HGET', G, 'seq:' .. n) or 0,
      'cursor', 0, 'pending', 0, 'queued', 0, 'running', 0, 'pending_re_run', 0,
      'successful', 0, 'failed', 0, 'cancelled', 0, 'retried', 0)
    redis.call('ZADD', G .. ':stages', n, n)
    follow_ttl(sk, G .. ':stages')
    st = 'pending'
  end
  if renamed then redis.call('HSET', sk, 'name', name) end
  return st
end

-- Read the head of a job spec: kind, time or delay (ms), expiry (ms), and where its
-- queue name starts and how long it is; or nil and why the spec is unusable. A usable
-- spec ("n", "a" or "i", whole numbers within the bounds above, a queue and a payload) is
-- one every script can send without an error, so scripts check specs before any write.
local function spec_head(spec)
  if type(spec) ~= 'string' then return nil, 'its spec is missing' end
  local kind, when, expires, qlen, at = string.match(spec, '^([nai])(%-?%d+)|(%d+)|(%d+)|()')
  if not kind then return nil, 'its spec cannot be parsed' end
  if #when > 15 or #expires > 15 or #qlen > 9 then return nil, 'a number in its spec is out of range' end
  when, expires, qlen = tonumber(when), tonumber(expires), tonumber(qlen)
  if kind == 'a' and (when < 0 or when > MAX_TIME_MS) then
    return nil, 'its time (' .. int(when) .. ' ms) is not between epoch 0 and the year 3000'
  end
  if kind == 'i' and (when < -MAX_DELAY_MS or when > MAX_DELAY_MS) then
    return nil, 'its delay (' .. int(when) .. ' ms) is longer than 100 years'
  end
  if expires > MAX_DELAY_MS then return nil, 'its expiry (' .. int(expires) .. ' ms) is longer than 100 years' end
  if qlen < 1 or at + qlen > #spec then return nil, 'its queue name or payload is cut short' end
  return kind, when, expires, at, qlen
end

-- Split a usable job spec into its schedule, expiry, queue and arq payload (nil and why
-- when it is unusable).
local function parse_spec(spec)
  local kind, when, expires, at, qlen = spec_head(spec)
  if not kind then return nil, when end
  return kind, when, expires, string.sub(spec, at, at + qlen - 1), string.sub(spec, at + qlen)
end

-- Write arq's own job record for a job spec; returns the queue and score of its queue
-- entry, for the caller to add, or nil and why when the spec is unusable (nothing is
-- written then). An "in" delay counts from now.
--
-- floor (optional): the earliest score (a rate limit's slot, see top_up); offset
-- (optional, ms): a priority's head start, taken off a score that is due at once.
local function write_arq_record(spec, id, now, floor, offset)
  local kind, when, expires, queue, payload = parse_spec(spec)
  if not kind then return nil, when end
  local score = due(now)
  if kind == 'a' then score = when elseif kind == 'i' then score = score + when end
  if floor and score < floor then score = math.floor(floor) end
  if offset and offset > 0 and score <= due(now) then score = math.max(1, score - offset) end
  local ttl = expires
  -- A time already past (the stage started after it) runs now: its record lives from now.
  if ttl <= 0 then ttl = math.max(score, now) - now + EXPIRES_EXTRA end
  if ttl < 1 then ttl = 1 end
  redis.call('SET', ARQ_JOB .. id, payload, 'PX', int(ttl))
  return queue, int(score)
end

-- Write arq's own job record and queue entry for a job spec (what ArqRedis.enqueue_job
-- does, minus its round trips). Returns true, or false and why the spec is unusable.
local function write_arq_job(spec, id, now)
  local queue, score = write_arq_record(spec, id, now)
  if not queue then return false, score end
  redis.call('ZADD', queue, score, id)
  return true
end

-- Take job seq of stage n out of arq's queue (it has not started, or waits for a retry).
local function unsend(sk, n, seq)
  local spec = redis.call('HGET', sk .. ':spec', seq)
  if not spec then return end
  local _, _, _, queue, _ = parse_spec(spec)
  local id = job_id(n, seq)
  if queue then redis.call('ZREM', queue, id) end
  redis.call('DEL', ARQ_JOB .. id)
end

local function delete_stage_keys(n)
  local sk = stage_key(n)
  redis.call('UNLINK', sk, sk .. ':jobs', sk .. ':spec', sk .. ':open', sk .. ':done',
    sk .. ':msg', sk .. ':err')
end

-- The group's summary as JSON: what callbacks, wait() and kept groups see.
local function summary(outcome, now, stage_n)
  local h = redis.call('HMGET', G, 'description', 'created', 'initiated')
  local out = {
    group_id = string.match(G, '{(.*)}'), description = h[1], outcome = outcome,
    created = tonumber(h[2]), initiated = tonumber(h[3]), at = now, stages = {},
    failed_jobs = {},
  }
  if stage_n then out.stage = tonumber(stage_n) end
  for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
    local sk = stage_key(n)
    local c = redis.call('HMGET', sk, 'status', 'successful', 'failed', 'cancelled', 'retried',
      'started', 'finished', 'name')
    out.stages[#out.stages + 1] = {
      number = tonumber(n), name = c[8] or nil, status = c[1], total = redis.call('LLEN', sk .. ':jobs'),
      successful = tonumber(c[2]) or 0, failed = tonumber(c[3]) or 0,
      cancelled = tonumber(c[4]) or 0, retried = tonumber(c[5]) or 0,
      started = tonumber(c[6]), finished = tonumber(c[7]),
    }
    if (tonumber(c[3]) or 0) > 0 and #out.failed_jobs < MAX_FAILED_IDS then
      for _, seq in ipairs(redis.call('HKEYS', sk .. ':err')) do
        if #out.failed_jobs >= MAX_FAILED_IDS then break end
        out.failed_jobs[#out.failed_jobs + 1] = job_id(n, seq)
      end
    end
  end
  return cjson.encode(out)
end

-- Keep the summary callbacks of event ev receive beside the group: a day, or keep_for.
local function keep_summary(ev, text)
  local keep = keep_for()
  if keep < SUMMARY_TTL then keep = SUMMARY_TTL end
  redis.call('SET', G .. ':summary:' .. ev, text, 'EX', int(keep))
end

-- Enqueue every callback registered for event ev, once (the caller's transition is
-- itself exactly-once). text: the summary when the caller has it, else made here.
-- Returns the summary text, or nil when no callback was registered.
local function fire(ev, outcome, now, stage_n, text)
  local cbs = redis.call('HGETALL', G .. ':callbacks')
  local kept = false
  for i = 1, #cbs, 2 do
    local field = cbs[i]
    if string.sub(field, 1, #ev + 1) == ev .. ':' then
      if not kept then
        text = text or summary(outcome, now, stage_n)
        keep_summary(ev, text)
        kept = true
      end
      local ok, why = write_arq_job(cbs[i + 1], IDBASE .. 'cb:' .. field, now)
      if not ok then
        -- Skipped, not fatal: the transition that fires it goes on (and no other
        -- callback is fired twice by a script that stopped half-way).
        redis.log(redis.LOG_WARNING, 'astages: callback ' .. IDBASE .. 'cb:' .. field .. ' not enqueued: ' .. why)
        event({'group', string.match(G, '{(.*)}'), 'to', 'callback_skipped', 'callback', field, 'error', why})
      end
    end
  end
  return text
end

-- Job seq (pending) of stage n cannot be handed to arq, its stored spec is unusable
-- (planted, or written by another version): it ends failed with the reason, as a failed
-- try would, instead of the script stopping half-way. The caller moves the stage on
-- and applies the failure policy (see sent_failed).
local function fail_unsendable(sk, n, seq, why, now)
  local reason = 'not sent to arq: ' .. why .. '; failed by astages'
  forget()
  redis.call('HDEL', sk .. ':open', seq)
  redis.call('HSET', sk .. ':done', seq, 'f0')
  redis.call('HSET', sk .. ':err', seq, reason)
  follow_ttl(sk .. ':done', sk .. ':err')
  count(sk, 'p', 'f0')
  event({'job', n .. ':' .. seq, 'from', 'pending', 'to', 'failed', 'try', 0, 'error', string.sub(reason, 1, 200)})
  if redis.call('HSETNX', G, 'failed_once', now) == 1 then fire('failure', 'running', now) end
end

-- Send pending job seq of stage n to arq. Returns true, or false when its spec was
-- unusable and it failed instead (see fail_unsendable).
local function send(sk, n, seq, now)
  local ok, why = write_arq_job(redis.call('HGET', sk .. ':spec', seq), job_id(n, seq), now)
  if not ok then
    fail_unsendable(sk, n, seq, why, now)
    return false
  end
  redis.call('HSET', sk .. ':open', seq, 'q')
  count(sk, 'p', 'q')
  return true
end

-- Flow control (issue 13). A running stage keeps at most a window of its jobs in
-- flight (sent to arq: queued, running or waiting for a retry; the stage's counters
-- queued + running + pending_re_run), fewer when a cap says so: max_in_flight of the
-- stage, and of the group (counting every stage of the group). Its other pending jobs
-- wait, in enqueue order, behind the stage's cursor (the index in :jobs of the next job
-- to look at). Whatever takes a job out of flight (a report, a cancel, a delete) tops the
-- window up in the same script (after_job_left), so a stage is never left with room and
-- jobs waiting unless a rate holds it, and groups sharing a queue share it: each has at
-- most a window of jobs ahead of a group that starts later.
--
-- A rate (rate_iv: ms between two jobs, on the stage and/or the group) is kept by the
-- scores the jobs get: each job sent is due one interval after the previous one (the
-- stage's and the group's rate_next), so arq's workers, whichever take them, release
-- them evenly. Jobs are scored at most RATE_AHEAD_MS ahead (the first job of a stage with
-- nothing in flight always goes, whatever its slot, so a slow rate is never stuck).
-- A priority (group, whole seconds) takes that many seconds off the score of each job
-- due at once: its jobs go ahead of those other groups sent up to that long after them,
-- and no longer (a group without priority waits at most that much more, never starves).
-- The default window (a group's window field, else DEFAULT_WINDOW; 0: no window).
local DEFAULT_WINDOW = 1000
local RATE_AHEAD_MS = 1000
local PRIORITY_MS = 1000

local flow = nil
-- The group's flow settings, read once per script: window (0: none), cap (nil: none),
-- iv (rate interval ms, nil: none), offset (priority head start, ms).
local function group_flow()
  if flow == nil then
    local h = redis.call('HMGET', G, 'window', 'max_in_flight', 'rate_iv', 'priority', 'cap_drain')
    local window = tonumber(h[1]) or DEFAULT_WINDOW
    if window < 0 then window = DEFAULT_WINDOW end
    local iv = tonumber(h[3])
    if iv and not (iv > 0) then iv = nil end
    flow = {window = window, cap = tonumber(h[2]), iv = iv, offset = (tonumber(h[4]) or 0) * PRIORITY_MS,
      drain = h[5]}
  end
  return flow
end

-- Jobs of stage n in flight.
local function stage_in_flight(sk)
  local c = redis.call('HMGET', sk, 'queued', 'running', 'pending_re_run')
  return (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0)
end

-- Room under the group's cap (every running stage's jobs in flight count), or nil when
-- the group has none. O(stages), read only for a group with a cap.
local function group_room()
  local cap = group_flow().cap
  if not cap then return nil end
  local used = 0
  for _, m in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
    local sk = stage_key(m)
    if redis.call('HGET', sk, 'status') == 'running' then used = used + stage_in_flight(sk) end
  end
  if group_flow().drain and used <= cap then  -- a lowered cap has drained (see set_limits.lua)
    redis.call('HDEL', G, 'cap_drain')
    group_flow().drain = nil
  end
  return cap - used
end

-- Send running stage n's next pending jobs to arq, in enqueue order, as far as its
-- window, caps and rate let (see above). budget: how many jobs of :jobs this call may
-- still look at (SEND_LIMIT per script call); g_room: room under the group's cap (nil:
-- none). Sets the stage's 'held' to what stops it while jobs wait ('window',
-- 'stage_cap', 'group_cap', 'rate'; '' when nothing does). Returns how many jobs could
-- still be sent now (the budget ran out: the caller sends on with send_more), the
-- budget left, how many jobs failed instead of being sent (unusable specs), and the
-- group's room left.
local function top_up(n, now, budget, g_room)
  local sk = stage_key(n)
  local h = redis.call('HMGET', sk, 'cursor', 'queued', 'running', 'pending_re_run', 'max_in_flight',
    'rate_iv', 'rate_next', 'held', 'cap_drain')
  local cursor = tonumber(h[1]) or 0
  local total = redis.call('LLEN', sk .. ':jobs')
  local was_held = h[8] or ''
  if cursor >= total then
    if was_held ~= '' then redis.call('HSET', sk, 'held', '') end
    return 0, budget, 0, g_room, true
  end
  local gf = group_flow()
  local in_flight = (tonumber(h[2]) or 0) + (tonumber(h[3]) or 0) + (tonumber(h[4]) or 0)
  local room, why = math.huge, ''
  if gf.window > 0 then room, why = gf.window - in_flight, 'window' end
  local cap = tonumber(h[5])
  if cap and cap - in_flight < room then room, why = cap - in_flight, 'stage_cap' end
  if h[9] and (not cap or in_flight <= cap) then redis.call('HDEL', sk, 'cap_drain') end  -- drained
  if g_room and g_room < room then room, why = g_room, 'group_cap' end
  local s_iv, g_iv = tonumber(h[6]), gf.iv
  if s_iv and not (s_iv > 0) then s_iv = nil end
  local s_next = tonumber(h[7]) or 0
  local g_next = g_iv and (tonumber(redis.call('HGET', G, 'rate_next')) or 0) or 0
  local base = due(now)
  local sent, failed, rated = 0, 0, false
  local queued, entries, bad = {}, {}, {}
  while sent < room and budget > 0 and cursor < total and not rated do
    local want = math.min(room - sent, budget)
    local seqs = redis.call('LRANGE', sk .. ':jobs', int(cursor), int(cursor + want - 1))
    if #seqs == 0 then break end
    local opens = redis.call('HMGET', sk .. ':open', unpack(seqs))
    local todo = {}
    for i, seq in ipairs(seqs) do
      if opens[i] == 'p' then todo[#todo + 1] = seq end
    end
    local specs = #todo > 0 and redis.call('HMGET', sk .. ':spec', unpack(todo)) or {}
    local k, looked = 0, 0
    for i, seq in ipairs(seqs) do
      if opens[i] == 'p' then
        k = k + 1
        local floor = nil
        if s_iv or g_iv then
          floor = math.max(base, s_iv and s_next or 0, g_iv and g_next or 0)
          if floor > base + RATE_AHEAD_MS and not (sent == 0 and in_flight == 0) then
            rated = true
            break
          end
          if s_iv then s_next = floor + s_iv end
          if g_iv then g_next = floor + g_iv end
        end
        local id = job_id(n, seq)
        local queue, score = write_arq_record(specs[k], id, now, floor, gf.offset)
        if queue then
          if not entries[queue] then entries[queue] = {} end
          local e = entries[queue]
          e[#e + 1] = score
          e[#e + 1] = id
          queued[#queued + 1] = seq
          queued[#queued + 1] = 'q'
          sent = sent + 1
        else
          bad[#bad + 1] = {seq, score}
        end
      end
      looked = i
      if sent >= room then break end
    end
    cursor = cursor + looked
    budget = budget - looked
  end
  for queue, e in pairs(entries) do redis.call('ZADD', queue, unpack(e)) end
  if #queued > 0 then
    redis.call('HSET', sk .. ':open', unpack(queued))
    redis.call('HINCRBY', sk, COUNTER.p, -sent)
    redis.call('HINCRBY', sk, COUNTER.q, sent)
  end
  for _, b in ipairs(bad) do fail_unsendable(sk, n, b[1], b[2], now) end
  failed = #bad
  local held = ''
  if cursor < total then
    if rated then held = 'rate' elseif sent >= room then held = why end
  end
  local set = {'cursor', int(cursor)}
  if s_iv then set[#set + 1] = 'rate_next'; set[#set + 1] = tostring(s_next) end
  if held ~= was_held then set[#set + 1] = 'held'; set[#set + 1] = held end
  redis.call('HSET', sk, unpack(set))
  if g_iv then redis.call('HSET', G, 'rate_next', tostring(g_next)) end
  local left = 0
  if budget <= 0 and cursor < total and not rated and sent < room then
    left = math.min(room - sent, total - cursor)
  end
  if g_room then g_room = g_room - sent end
  return left, budget, failed, g_room, cursor >= total
end

local function complete_stage(n, now)
  forget()
  redis.call('HSET', stage_key(n), 'status', 'complete', 'finished', now)
  event({'stage', n, 'to', 'complete'})
  fire('stage.' .. n, 'running', now, n)
end

-- Cancel every open job of stage n: jobs not started leave arq's queue, running ones
-- are asked to abort (arq honours it when the worker has allow_abort_jobs).
local function cancel_stage_jobs(n, now)
  local sk = stage_key(n)
  forget()
  local open = redis.call('HGETALL', sk .. ':open')
  local cancelled = 0
  for i = 1, #open, 2 do
    local seq, cur = open[i], open[i + 1]
    local c = string.sub(cur, 1, 1)
    if c == 'r' then
      -- Ask arq to abort only a run it has under way: a run that ended (its report was
      -- lost) would leave an entry arq never removes; a try arq re-queued (a Retry whose
      -- report was lost) leaves arq's queue as an unstarted job does.
      if redis.call('EXISTS', ARQ_IN_PROGRESS .. job_id(n, seq)) == 1 then
        redis.call('ZADD', ARQ_ABORT, now, job_id(n, seq))
      else
        unsend(sk, n, seq)
      end
    elseif c == 'q' or c == 'e' then
      unsend(sk, n, seq)
    end
    local code = 'c' .. try_of(cur)
    redis.call('HSET', sk .. ':done', seq, code)
    count(sk, cur, code)
    cancelled = cancelled + 1
  end
  follow_ttl(sk .. ':done')
  redis.call('DEL', sk .. ':open')
  redis.call('HSET', sk, 'cursor', redis.call('LLEN', sk .. ':jobs'))
  return cancelled
end

local function cancel_stage(n, now)
  local cancelled = cancel_stage_jobs(n, now)
  redis.call('HSET', stage_key(n), 'status', 'cancelled', 'finished', now)
  event({'stage', n, 'to', 'cancelled', 'jobs', cancelled})
  fire('stage.' .. n, 'cancelled', now, n)
end

-- Delete every key of the group (callback summaries stay until they expire).
local function drop_group()
  for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do delete_stage_keys(n) end
  redis.call('UNLINK', G, G .. ':stages', G .. ':callbacks', G .. ':events')
  redis.call('ZREM', INDEX, string.match(G, '{(.*)}'))
end

-- The group is over: fire its callbacks, tell waiters, then delete every key of the
-- group, or keep it readable for keep_for seconds.
local function finish_group(now, outcome)
  outcome = outcome or 'complete'
  local failed = 0
  local ended = {successful = 0, failed = 0, cancelled = 0, retried = 0}
  for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
    local c = redis.call('HMGET', stage_key(n), 'failed', 'cancelled', 'successful', 'retried')
    failed = failed + (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0)
    ended.failed = ended.failed + (tonumber(c[1]) or 0)
    ended.cancelled = ended.cancelled + (tonumber(c[2]) or 0)
    ended.successful = ended.successful + (tonumber(c[3]) or 0)
    ended.retried = ended.retried + (tonumber(c[4]) or 0)
  end
  -- The prefix's cumulative totals (see the layout above): once per group, as it ends.
  local totals = string.sub(INDEX, 1, #INDEX - #'groups') .. 'totals'
  for field, k in pairs(ended) do
    if k > 0 then redis.call('HINCRBY', totals, field, k) end
  end
  local text = summary(outcome, now)
  fire('complete', outcome, now, nil, text)
  if outcome == 'complete' and failed == 0 then fire('success', outcome, now, nil, text) end
  redis.call('PUBLISH', IDBASE .. 'finished', text)
  local keep = keep_for()
  if keep > 0 then
    local gid = string.match(G, '{(.*)}')
    redis.call('HSET', G, 'status', outcome, 'finished', now, 'summary', text)
    event({'group', gid, 'to', outcome})
    local keys = {G, G .. ':stages', G .. ':callbacks', G .. ':events'}
    for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
      local sk = stage_key(n)
      for _, k in ipairs({sk, sk .. ':jobs', sk .. ':spec', sk .. ':open', sk .. ':done', sk .. ':msg', sk .. ':err'}) do
        keys[#keys + 1] = k
      end
    end
    for _, k in ipairs(keys) do redis.call('EXPIRE', k, int(keep)) end
    return
  end
  drop_group()
end

-- Stop the group with outcome ('failed' by a failure policy, or 'cancelled'): every
-- stage not complete is cancelled, later stages never start.
local function stop_group(now, outcome)
  for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
    local st = redis.call('HGET', stage_key(n), 'status')
    if st == 'pending' or st == 'running' then cancel_stage(n, now) end
  end
  finish_group(now, outcome)
  return {'finished', '', 0}
end

-- True when stage n's failures breach its failure policy (the stage's own, else the
-- group's; -1 or none means "continue").
local function policy_breached(n)
  local sk = stage_key(n)
  local s = redis.call('HMGET', sk, 'max_failed', 'max_ratio', 'failed')
  local g = redis.call('HMGET', G, 'max_failed', 'max_ratio')
  local max_failed = tonumber(s[1] or g[1] or '-1')
  local max_ratio = tonumber(s[2] or g[2] or '-1')
  local failed = tonumber(s[3]) or 0
  if max_failed >= 0 and failed > max_failed then return true end
  if max_ratio >= 0 then
    local total = redis.call('LLEN', sk .. ':jobs')
    if total > 0 and failed / total > max_ratio then return true end
  end
  return false
end

-- True when jobs of stage n failed at sending (top_up's third result) and that
-- breaches the failure policy: the caller stops the group (stop_group), as finish_job
-- does for a failed try.
local function sent_failed(n, failed)
  return failed ~= nil and failed > 0 and not group_final() and policy_breached(n)
end

-- Move the group on: keep sending the running stage(s) (as their limits let, see
-- top_up); when none runs, start the lowest pending stage (an empty one completes at
-- once and the next is tried); when every stage is complete the group finishes and its
-- keys are deleted.
-- Returns {outcome, stage, jobs that could be sent now but wait for the next call
-- (send_more)}: outcome is 'running' or 'finished'.
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
      local left, ended = 0, false
      local g_room = group_room()
      for _, n in ipairs(running) do
        local l, failed
        l, budget, failed, g_room = top_up(n, now, budget, g_room)
        if sent_failed(n, failed) then return stop_group(now, 'failed') end
        left = left + l
        -- jobs that failed at sending may have been the stage's last open ones
        if redis.call('HLEN', stage_key(n) .. ':open') == 0 then
          complete_stage(n, now)
          ended = true
        end
      end
      if not ended then return {'running', running[1], left} end
    else
      if first_pending == nil then
        finish_group(now, 'complete')
        return {'finished', '', 0}
      end
      local sk = stage_key(first_pending)
      forget()
      redis.call('HSET', sk, 'status', 'running', 'started', now)
      event({'stage', first_pending, 'to', 'running', 'jobs', redis.call('HLEN', sk .. ':open')})
      local left, failed
      left, budget, failed = top_up(first_pending, now, budget, group_room())
      if sent_failed(first_pending, failed) then return stop_group(now, 'failed') end
      if redis.call('HLEN', sk .. ':open') > 0 then
        return {'running', first_pending, left}
      end
      complete_stage(first_pending, now)
    end
  end
end

-- Top up after jobs left flight (see top_up): stage n alone, or, in a group with a cap
-- or a rate (shared by its stages), every running stage, lowest first. Returns the jobs
-- that could be sent now but wait for send_more, and true when a stage's jobs failed at
-- sending and that breaches its failure policy.
local function refill(n, now)
  local gf = group_flow()
  if not gf.cap and not gf.iv then
    local left, _, failed, _, drained = top_up(n, now, SEND_LIMIT, nil)
    return left, sent_failed(n, failed), drained
  end
  local g_room, budget, left = group_room(), SEND_LIMIT, 0
  for _, m in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do
    if redis.call('HGET', stage_key(m), 'status') == 'running' then
      local l, failed
      l, budget, failed, g_room = top_up(m, now, budget, g_room)
      left = left + l
      if sent_failed(m, failed) then return left, true end
    end
  end
  return left, false
end

-- A batch of reports (end_jobs, finish_jobs: see defer_refills) tops a stage up once,
-- after its last report, instead of once per report: one read of the stage's job list
-- and one write of arq's queue for the jobs the whole batch made room for. refills: the
-- stages whose top-up waits, in order; refilling: stage -> whether it still waits (a
-- later report that left none of its jobs open topped it up itself); last_open: stage ->
-- the place of its last 'open' reply in the batch's replies. nil outside a batch.
local refills, refilling, last_open = nil, nil, nil

local function defer_refills()
  refills, refilling, last_open = {}, {}, {}
end

-- A batch's reply i, to a report of stage n: kept in out (see flush_refills).
local function batch_reply(out, i, n, reply)
  out[i] = reply
  if last_open and reply[1] == 'open' then last_open[n] = i end
end

-- After a job of stage n left :open, or left flight (a report, a cancel, a delete):
-- top the window up; complete the stage when it was the last open job of a running
-- stage, then move the group on.
-- The reports of a batch share its reads of the stage (see memo_status): once a stage had
-- nothing waiting behind its cursor and the group has no cap or rate (whose room every
-- report changes), a report that leaves other jobs of it open costs no read at all. In a
-- batch that defers its top-ups, a report that leaves jobs of the stage open only notes
-- the stage (see flush_refills).
local function after_job_left(n, now)
  local sk = stage_key(n)
  if memo_status[sk] == nil then memo_status[sk] = redis.call('HGET', sk, 'status') or false end
  if memo_status[sk] ~= 'running' then return {'open', n, 0} end
  local gf = group_flow()
  if memo_drained[sk] and memo_open[sk] and memo_open[sk] > 0 and not gf.cap and not gf.iv then
    return {'open', n, 0, memo_open[sk]}
  end
  if refills then
    if memo_open[sk] == nil then memo_open[sk] = redis.call('HLEN', sk .. ':open') end
    if memo_open[sk] > 0 then
      if refilling[n] == nil then refills[#refills + 1] = n end
      refilling[n] = true
      return {'open', n, 0, memo_open[sk]}
    end
    refilling[n] = false  -- its last open job: topped up and completed below, as alone
  end
  flush_counts()  -- top_up and the failure policy read the counters
  local left, breached, drained = refill(n, now)
  if breached then return stop_group(now, 'failed') end
  local open = redis.call('HLEN', sk .. ':open')
  if open > 0 then
    memo_drained[sk], memo_open[sk] = drained, open
    return {'open', n, left, open}
  end
  complete_stage(n, now)
  if redis.call('HGET', G, 'status') ~= 'running' then return {'complete', n, 0} end
  return advance(now)
end

-- The deferred top-ups of a batch (see refills), stage by stage in the order their
-- reports came: each is after_job_left as a lone report would have run it (it may start
-- the next stage, or stop the group when jobs that fail at sending breach its policy).
-- Its reply replaces, in out, the reply to the stage's last report left 'open'.
local function flush_refills(now, out)
  local todo, waiting, at = refills or {}, refilling or {}, last_open or {}
  refills, refilling, last_open = nil, nil, nil
  for _, n in ipairs(todo) do
    if waiting[n] then
      forget()  -- reread: an earlier top-up may have moved the group on
      out[at[n]] = after_job_left(n, now)
    end
  end
end

-- Whether the group exists, read once per call (a batch reads it again after a job's
-- transition moved the group on: see batch_step).
local group_exists = nil
local function group_alive()
  if group_exists == nil then group_exists = redis.call('EXISTS', G) == 1 end
  return group_exists
end

-- The time of a per-job call, read once per call (a batch's transitions share it).
local call_now = nil
local function script_now()
  if call_now == nil then call_now = now_ms() end
  return call_now
end

-- A worker picked up try `try` of job seq of stage n (start_job.lua, start_jobs.lua,
-- claim_jobs.lua). Returns 'run' (now running), or why it must not run: 'gone' (no such
-- job, stage or group) or 'final' (it finished already; arq re-delivered it).
local function start_one(n, seq, try)
  if not group_alive() then return 'gone' end
  local sk = stage_key(n)
  local cur = redis.call('HGET', sk .. ':open', seq)  -- a job is in :open or in :done
  if not cur then
    if redis.call('HEXISTS', sk .. ':done', seq) == 1 then return 'final' end
    return 'gone'
  end
  local code = 'r' .. try
  if cur ~= code then
    redis.call('HSET', sk .. ':open', seq, code)
    count_later(sk, cur, code)
    event({'job', n .. ':' .. seq, 'from', STATUS[string.sub(cur, 1, 1)], 'to', 'running', 'try', try})
  end
  return 'run'
end

-- Report the outcome of try `try` of job seq of stage n (finish_job.lua, finish_jobs.lua,
-- end_jobs.lua): outcome is 's' (successful), 'f' (failed, err the error) or 'e' (will be
-- re-run). A failure that breaches the failure policy stops the group (see stop_group).
-- Idempotent: a report for a job already final, or older than the job's latest try,
-- changes nothing. Returns {outcome, stage, jobs still to send} where outcome is
-- 'gone', 'dup', 'stale', 'retry', 'open' (stage still has open jobs), 'complete',
-- 'running' (the group moved on to a stage) or 'finished' (the group is done); an 'open'
-- of a running stage adds how many of its jobs are open (a worker's coalescer sends the
-- report that may end the stage at once, see astages/worker.py).
-- unmarked: the run was never marked running (a first try a worker ran at once and
-- reported before its mark went, see finish_jobs.lua): a queued job's events show it
-- running first, as if its mark had gone.
local function finish_one(n, seq, try, outcome, err, unmarked)
  if not group_alive() then return {'gone', '', 0} end
  local sk = stage_key(n)
  local cur = redis.call('HGET', sk .. ':open', seq)  -- a job is in :open or in :done
  if not cur then
    if redis.call('HEXISTS', sk .. ':done', seq) == 1 then return {'dup', n, 0} end
    return {'gone', n, 0}
  end
  if try_of(cur) > try then return {'stale', n, 0} end
  local from = STATUS[string.sub(cur, 1, 1)]
  if unmarked and from == 'queued' then
    event({'job', n .. ':' .. seq, 'from', from, 'to', 'running', 'try', try})
    from = 'running'
  end
  if outcome == 'e' then
    local code = 'e' .. try
    if cur == code then return {'dup', n, 0} end
    redis.call('HSET', sk .. ':open', seq, code)
    count(sk, cur, code)
    redis.call('HINCRBY', sk, 'retried', 1)
    event({'job', n .. ':' .. seq, 'from', from, 'to', 'pending_re_run', 'try', try})
    return {'retry', n, 0}
  end
  redis.call('HDEL', sk .. ':open', seq)
  if memo_open[sk] then memo_open[sk] = memo_open[sk] - 1 end
  local code = outcome .. try
  redis.call('HSET', sk .. ':done', seq, code)
  count_later(sk, cur, code)
  local now = script_now()
  if outcome == 'f' then
    flush_counts()  -- the failure callbacks' summary and the failure policy read them
    redis.call('HSET', sk .. ':err', seq, err)
  end
  follow_ttl(sk .. ':done', sk .. ':err')  -- after the writes: PEXPIRE of a missing key does nothing
  if outcome == 'f' then
    event({'job', n .. ':' .. seq, 'from', from, 'to', 'failed', 'try', try,
      'error', string.sub(err, 1, 200)})
    if redis.call('HSETNX', G, 'failed_once', now) == 1 then fire('failure', 'running', now) end
    if not group_final() and policy_breached(n) then return stop_group(now, 'failed') end
  else
    event({'job', n .. ':' .. seq, 'from', from, 'to', 'successful', 'try', try})
  end
  return after_job_left(n, now)
end

-- In a batch (start_jobs, finish_jobs, claim_jobs, end_jobs), what one job's transition
-- read once for the call (the group's TTL and events cap) is read again for the next job
-- after a transition that moved the group on (finishing it may keep it with a new TTL).
-- Returns true when it did (the group moved on).
local function batch_step(reply)
  local o = type(reply) == 'table' and reply[1] or reply
  if o ~= 'open' and o ~= 'retry' and o ~= 'dup' and o ~= 'stale' and o ~= 'run' then
    group_pttl = nil
    events_cap = nil
    group_exists = nil
    forget()
    return true
  end
  return false
end

-- A call a user makes (every script but a worker's per-job reports and the maintenance
-- passes, see REPEATABLE in astages/_scripts.py) has the effect of one call however often it is
-- sent: a reply lost on a dropped connection makes the client's retry policy send the
-- same command again. Such a script's text is wrapped as body() and run by once(): its
-- reply is kept under KEYS[3] ("<prefix>:reply:<random token of the call>") for
-- REPLY_TTL ms, written in the same atomic script, and a call that finds it gets that
-- reply back without acting again. A Lua error writes no reply (nothing to repeat).
local REPLY_TTL = 60000

local function once(body)
  local seen = redis.call('GET', KEYS[3])
  if seen then return cjson.decode(seen) end
  local reply = body()
  redis.call('SET', KEYS[3], cjson.encode(reply), 'PX', REPLY_TTL)
  return reply
end
