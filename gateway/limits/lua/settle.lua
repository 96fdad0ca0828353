-- Quadruples (op, key, field, value), every key also in KEYS: 'r' releases lease `value` of zset
-- `key`; 'c' adds `value` to calendar hash `key` if it still counts window `field`; 'h' adds `value`
-- to bucket `field` of sliding hash `key` and to its total. What has expired (the window, the
-- bucket) is left alone; nothing goes below zero.
for i = 1, #ARGV, 4 do
  local op, key, field, value = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  if op == 'r' then
    redis.call('ZREM', key, ARGV[i + 3])
  elseif op == 'c' then
    local v = redis.call('HMGET', key, 'n', 'v')
    if v[1] == field then redis.call('HSET', key, 'v', math.max(0, tonumber(v[2]) + value)) end
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
