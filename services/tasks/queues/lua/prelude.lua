-- Shared by the scripts that end a task (prepended to them by redis_queue.py).
local function fmt(x) return string.format('%d', x) end
local function finish(task, now, ttl, state, code, msg)
  redis.call('HSET', task, 'state', state, 'finished_ms', fmt(now), 'expires_ms', fmt(now + ttl),
             'error_code', code, 'error_message', msg)
  redis.call('HDEL', task, 'request')
  redis.call('PEXPIRE', task, fmt(2 * ttl))
end
