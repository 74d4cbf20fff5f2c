-- KEYS: task, stream, held (the owner's quota). ARGV: now, result_ttl, channel, task_id, cancelled_code -> 0 when unknown
local f = redis.call('HMGET', KEYS[1], 'state', 'entry')
if not f[1] then return 0 end
local state = tonumber(f[1])
if state == 1 or state == 2 then
  finish(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 5, ARGV[5], 'cancelled by the client',
         KEYS[3], ARGV[4])
  if state == 1 and f[2] then redis.call('XDEL', KEYS[2], f[2]) end
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
