-- Count one use of KEYS[1] unless the count has reached the cap.
-- ARGV[1]: cap; ARGV[2]: window in ms, started by the first use.
-- Returns {allowed (1 or 0), count, PTTL of the counter in ms}.
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local allowed = 0
if count < tonumber(ARGV[1]) then
  allowed = 1
  count = redis.call('INCR', KEYS[1])
  if count == 1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
end
return {allowed, count, redis.call('PTTL', KEYS[1])}
