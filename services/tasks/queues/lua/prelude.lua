-- Shared by the scripts that end a task (prepended to them by redis_backend.py).
local function fmt(x) return string.format('%d', x) end
-- held: the owner's sorted set of task ids scored by when each is forgotten (its key quota);
-- the task is forgotten 2 * ttl from now, so is its place in the quota.
local function finish(task, now, ttl, state, code, msg, held, tid)
  redis.call('HSET', task, 'state', state, 'finished_ms', fmt(now), 'expires_ms', fmt(now + ttl),
             'error_code', code, 'error_message', msg)
  redis.call('HDEL', task, 'request')
  redis.call('PEXPIRE', task, fmt(2 * ttl))
  if redis.call('ZADD', held, 'XX', 'CH', fmt(now + 2 * ttl), tid) == 1
      and redis.call('PTTL', held) < 2 * ttl then
    redis.call('PEXPIRE', held, fmt(2 * ttl))
  end
end
