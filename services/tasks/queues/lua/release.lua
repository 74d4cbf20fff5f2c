-- KEYS: task. ARGV: code, message, channel, task_id
if tonumber(redis.call('HGET', KEYS[1], 'state') or '0') == 2 then
  redis.call('HSET', KEYS[1], 'state', 1, 'error_code', ARGV[1], 'error_message', ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
