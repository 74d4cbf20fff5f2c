-- KEYS: stream, then (task, idem) per task. ARGV: max_queue, now, n, result_ttl, then
-- (task_id, has_idem, deadline, request, owner) per task. -> {1, ids...} or {0, queue length}
local maxq, now, n, rttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local fresh = 0
for i = 1, n do
  if ARGV[4 + (i - 1) * 5 + 2] == '0' or redis.call('EXISTS', KEYS[2 * i + 1]) == 0 then
    fresh = fresh + 1
  end
end
local len = redis.call('XLEN', KEYS[1])
if fresh > 0 and len + fresh > maxq then return {0, len} end
local out = {1}
for i = 1, n do
  local b = 4 + (i - 1) * 5
  local tid, deadline = ARGV[b + 1], tonumber(ARGV[b + 3])
  local keep = fmt(deadline - now + 2 * rttl)
  local existing = false
  if ARGV[b + 2] == '1' and not redis.call('SET', KEYS[2 * i + 1], tid, 'NX', 'PX', keep) then
    existing = redis.call('GET', KEYS[2 * i + 1])
  end
  if existing then
    out[i + 1] = existing
  else
    local entry = redis.call('XADD', KEYS[1], '*', 't', tid)
    redis.call('HSET', KEYS[2 * i], 'state', 1, 'request', ARGV[b + 4], 'submitted_ms', ARGV[2],
               'deadline_ms', ARGV[b + 3], 'entry', entry, 'runs', 0, 'finishes', 0,
               'owner', ARGV[b + 5])
    redis.call('PEXPIRE', KEYS[2 * i], keep)
    out[i + 1] = tid
  end
end
return out
