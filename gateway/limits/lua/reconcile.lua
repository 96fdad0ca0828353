-- Spend one replica admitted while the store was unreachable, added to the budgets' calendar hashes:
-- quadruples (key, window number, nano-USD, ms the hash lives should this make it). A window the
-- hash has moved past is over (nothing to add); one it lost meanwhile is made again; none below zero.
for i = 1, #ARGV, 4 do
  local key, number, amount = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local v = redis.call('HMGET', key, 'n', 'v')
  local counted = tonumber(v[1])
  if counted == number then
    redis.call('HSET', key, 'v', math.max(0, tonumber(v[2]) + amount))
  elseif not counted or counted < number then
    redis.call('HSET', key, 'n', number, 'v', math.max(0, amount))
    redis.call('PEXPIRE', key, ARGV[i + 3])
  end
end
return 1
