-- KEYS: task, stream, result, held (the owner's quota). ARGV: group, entry, now, result_ttl, state, code, message,
-- response, channel, task_id. -> 1 when this call completed the task
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
local mine = 0
if state == 2 then
  local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
  finish(KEYS[1], now, ttl, tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], KEYS[4], ARGV[10])
  if ARGV[5] == '3' then redis.call('SET', KEYS[3], ARGV[8], 'PX', ARGV[4]) end
  redis.call('HINCRBY', KEYS[1], 'finishes', 1)
  redis.call('PUBLISH', ARGV[9], ARGV[10])
  mine = 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]); redis.call('XDEL', KEYS[2], ARGV[2])
return mine
