for i = 1, #ARGV, 3 do
  local key = ARGV[i + 1]
  if ARGV[i] == 'r' then
    redis.call('ZREM', key, ARGV[i + 2])
  elseif redis.call('EXISTS', key) == 1 and redis.call('INCRBY', key, ARGV[i + 2]) < 0 then
    redis.call('SET', key, 0, 'KEEPTTL')
  end
end
return 1
