-- Spend one replica admitted while the store was unreachable, added to the budgets' counters. A
-- counter the store lost meanwhile is made again, expiring with its window; none goes below zero.
for i = 1, #ARGV, 3 do
  local key = ARGV[i]
  local value = redis.call('INCRBY', key, ARGV[i + 1])
  if redis.call('PTTL', key) == -1 then
    redis.call('PEXPIRE', key, ARGV[i + 2])
  end
  if value < 0 then
    redis.call('SET', key, 0, 'KEEPTTL')
  end
end
return 1
