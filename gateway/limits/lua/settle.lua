-- Quadruples (op, key, field, value): 'r' releases lease `value` of zset `key`; 'c' adds `value`
-- to calendar counter `key`; 'h' adds `value` to bucket `field` of sliding hash `key` and to its
-- total. What has expired (the counter, the bucket) is left alone; nothing goes below zero.
for i = 1, #ARGV, 4 do
  local op, key, field, value = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  if op == 'r' then
    redis.call('ZREM', key, ARGV[i + 3])
  elseif op == 'c' then
    if redis.call('EXISTS', key) == 1 and redis.call('INCRBY', key, value) < 0 then
      redis.call('SET', key, 0, 'KEEPTTL')
    end
  else
    local v = redis.call('HMGET', key, field, 't')
    if v[1] then
      local count = tonumber(v[1])
      local corrected = math.max(0, count + value)
      redis.call('HSET', key, field, corrected, 't', math.max(0, (tonumber(v[2]) or 0) + corrected - count))
    end
  end
end
return 1
