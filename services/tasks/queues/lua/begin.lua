-- KEYS: task, stream, dead, held (the owner's quota). ARGV: group, entry, now, deliveries, max_deliveries, result_ttl,
-- channel, task_id, deadline_code, internal_code, dead_maxlen.
-- -> {'run', request, deadline, submitted} or {why}
local function ack() redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]); redis.call('XDEL', KEYS[2], ARGV[2]) end
local f = redis.call('HMGET', KEYS[1], 'state', 'deadline_ms', 'request', 'error_code', 'error_message',
                    'submitted_ms')
if not f[1] then ack(); return {'gone'} end
local state = tonumber(f[1])
if state ~= 1 and state ~= 2 then ack(); return {'done'} end
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[6])
if now >= tonumber(f[2]) then
  finish(KEYS[1], now, ttl, 6, ARGV[9], 'the task waited past its deadline', KEYS[4], ARGV[8])
  ack(); redis.call('PUBLISH', ARGV[7], ARGV[8]); return {'expired'}
end
if tonumber(ARGV[4]) > tonumber(ARGV[5]) then
  local code = tonumber(f[4] or '0') or 0
  if code == 0 then code = tonumber(ARGV[10]) end
  local why = 'its runner stopped each time'
  if f[5] and f[5] ~= '' then why = f[5] end
  local msg = 'gave up after ' .. ARGV[5] .. ' deliveries: ' .. why
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[11], '*', 't', ARGV[8], 'deliveries', ARGV[4],
             'error', msg)
  finish(KEYS[1], now, ttl, 4, code, msg, KEYS[4], ARGV[8])
  ack(); redis.call('PUBLISH', ARGV[7], ARGV[8]); return {'dead'}
end
redis.call('HSET', KEYS[1], 'state', 2, 'started_ms', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'runs', 1)
if state ~= 2 then redis.call('PUBLISH', ARGV[7], ARGV[8]) end
return {'run', f[3], f[2], f[6]}
