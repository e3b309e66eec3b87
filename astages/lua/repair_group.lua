-- The Cleaner's orphan repair for one group (see astages/cleaner.py). ARGV[6..] are the
-- stage numbers SCAN found keys for. Recreates what is missing, with the same ids (a
-- staged job's arq id names its group and stage, so they cannot move):
--   a stage's keys without the stage hash -> the stage hash, counters from its jobs;
--   stage keys without the group hash     -> the group hash ('recovered by astages');
--   job seqs in :open/:done missing from :jobs, stages missing from :stages and a
--   group missing from the index          -> re-added;
--   :stages entries and an index entry with nothing behind them -> dropped.
-- A recreated stage is 'running' when one of its jobs is with arq, 'complete' when
-- every job is final, else 'pending'; a recreated group runs when a stage runs.
-- Returns a flat list of what it did: kind, detail, kind, detail, ...
local out = {}
local gid = string.match(G, '{(.*)}')
local now = now_ms()
local numbers, order = {}, {}
local function note(n)
  n = tostring(n)
  if not numbers[n] then numbers[n] = true; order[#order + 1] = n end
end
for i = 6, #ARGV do note(ARGV[i]) end
for _, n in ipairs(redis.call('ZRANGE', G .. ':stages', 0, -1)) do note(n) end
local live, running = 0, false
for _, n in ipairs(order) do
  local sk = stage_key(n)
  local present = redis.call('EXISTS', sk, sk .. ':jobs', sk .. ':spec', sk .. ':open', sk .. ':done',
    sk .. ':msg', sk .. ':err')
  if present == 0 then
    if redis.call('ZREM', G .. ':stages', n) == 1 then
      out[#out + 1] = 'stage_dropped'; out[#out + 1] = gid .. ':' .. n
    end
  else
    live = live + 1
    local listed, top = {}, 0
    for _, seq in ipairs(redis.call('LRANGE', sk .. ':jobs', 0, -1)) do
      listed[seq] = true
      if tonumber(seq) and tonumber(seq) > top then top = tonumber(seq) end
    end
    local counts = {p = 0, q = 0, r = 0, e = 0, s = 0, f = 0, c = 0}
    local with_arq, open_n, done_n = false, 0, 0
    for _, part in ipairs({'open', 'done'}) do
      local flat = redis.call('HGETALL', sk .. ':' .. part)
      for i = 1, #flat, 2 do
        local seq, c = flat[i], string.sub(flat[i + 1], 1, 1)
        if counts[c] then counts[c] = counts[c] + 1 end
        if c == 'q' or c == 'r' or c == 'e' then with_arq = true end
        if part == 'open' then open_n = open_n + 1 else done_n = done_n + 1 end
        if tonumber(seq) and tonumber(seq) > top then top = tonumber(seq) end
        if not listed[seq] then
          listed[seq] = true
          redis.call('RPUSH', sk .. ':jobs', seq)
          out[#out + 1] = 'job_relinked'; out[#out + 1] = job_id(n, seq)
        end
      end
    end
    local st = redis.call('HGET', sk, 'status')
    if not st then
      if with_arq then st = 'running' elseif open_n == 0 and done_n > 0 then st = 'complete' else st = 'pending' end
      redis.call('HSET', sk, 'number', n, 'status', st, 'created', now, 'seq', top, 'cursor', 0,
        'pending', counts.p, 'queued', counts.q, 'running', counts.r, 'pending_re_run', counts.e,
        'successful', counts.s, 'failed', counts.f, 'cancelled', counts.c, 'retried', 0)
      if st ~= 'pending' then redis.call('HSET', sk, 'started', now) end
      if st == 'complete' then redis.call('HSET', sk, 'finished', now) end
      out[#out + 1] = 'stage_recreated'; out[#out + 1] = gid .. ':' .. n
    end
    if st == 'running' then running = true end
    if not redis.call('ZSCORE', G .. ':stages', n) then
      redis.call('ZADD', G .. ':stages', n, n)
      out[#out + 1] = 'stage_relinked'; out[#out + 1] = gid .. ':' .. n
    end
  end
end
if redis.call('EXISTS', G) == 0 then
  if live == 0 and redis.call('EXISTS', G .. ':stages') == 0 then
    if redis.call('ZREM', INDEX, gid) == 1 then
      out[#out + 1] = 'index_dropped'; out[#out + 1] = gid
    end
    return out
  end
  redis.call('HSET', G, 'description', 'recovered by astages Cleaner', 'created', now,
    'status', running and 'running' or 'pending')
  if running then redis.call('HSET', G, 'initiated', now) end
  out[#out + 1] = 'group_recreated'; out[#out + 1] = gid
end
if not redis.call('ZSCORE', INDEX, gid) then
  redis.call('ZADD', INDEX, redis.call('HGET', G, 'created') or now, gid)
  out[#out + 1] = 'group_reindexed'; out[#out + 1] = gid
end
return out
