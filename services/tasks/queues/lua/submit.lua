-- KEYS: stream, then (task, idem, held) per task (held: the owner's sorted set of task ids
-- scored by when each is forgotten). ARGV: max_queue, now, n, result_ttl, max_per_key, then
-- (task_id, has_idem, deadline, request, owner) per task.
-- -> {1, ids...}, {0, queue length} (queue full) or {2, held} (an owner past its quota)
local maxq, now, n, rttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local maxk = tonumber(ARGV[5])
local fresh, adding = 0, {}
for i = 1, n do
  local b, k = 5 + (i - 1) * 5, 1 + (i - 1) * 3
  if ARGV[b + 2] == '0' or redis.call('EXISTS', KEYS[k + 2]) == 0 then
    fresh = fresh + 1
    if ARGV[b + 5] ~= '' then adding[KEYS[k + 3]] = (adding[KEYS[k + 3]] or 0) + 1 end
  end
end
local len = redis.call('XLEN', KEYS[1])
if fresh > 0 and len + fresh > maxq then return {0, len} end
for held, count in pairs(adding) do
  redis.call('ZREMRANGEBYSCORE', held, '-inf', ARGV[2])  -- tasks forgotten by now
  local holds = redis.call('ZCARD', held)
  if holds + count > maxk then return {2, holds} end
end
local out = {1}
for i = 1, n do
  local b, k = 5 + (i - 1) * 5, 1 + (i - 1) * 3
  local tid, deadline = ARGV[b + 1], tonumber(ARGV[b + 3])
  local keep = deadline - now + 2 * rttl
  local existing = false
  if ARGV[b + 2] == '1' and not redis.call('SET', KEYS[k + 2], tid, 'NX', 'PX', fmt(keep)) then
    existing = redis.call('GET', KEYS[k + 2])
  end
  if existing then
    out[i + 1] = existing
  else
    local entry = redis.call('XADD', KEYS[1], '*', 't', tid, 'o', ARGV[b + 5])
    redis.call('HSET', KEYS[k + 1], 'state', 1, 'request', ARGV[b + 4], 'submitted_ms', ARGV[2],
               'deadline_ms', ARGV[b + 3], 'entry', entry, 'runs', 0, 'finishes', 0,
               'owner', ARGV[b + 5])
    redis.call('PEXPIRE', KEYS[k + 1], fmt(keep))
    if ARGV[b + 5] ~= '' then
      redis.call('ZADD', KEYS[k + 3], fmt(now + keep), tid)
      if redis.call('PTTL', KEYS[k + 3]) < keep then redis.call('PEXPIRE', KEYS[k + 3], fmt(keep)) end
    end
    out[i + 1] = tid
  end
end
return out
