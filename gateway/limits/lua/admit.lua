local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local DAY = 86400000
local LENGTHS = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31}
-- Month number and ms to its end, in UTC (H. Hinnant's civil_from_days).
local function month(ms)
  local z = math.floor(ms / DAY) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)
  yoe = math.floor(yoe / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  local length = LENGTHS[m]
  if m == 2 and y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) then length = 29 end
  return y * 12 + m - 1, (length - d + 1) * DAY - ms % DAY
end

local member, report = ARGV[1], ARGV[2] == '1'
-- A sliding limit is one hash: t (usage still counted), o (its oldest bucket with usage), and per
-- bucket b its usage (field b) and last charge (field lb). A bucket's usage counts until a window
-- after its last charge: only a bucket a span (window / bucket) or more behind can have left.
local function bucket_of(s, b)  -- usage and last charge of bucket b
  local v = redis.call('HMGET', s.key, b, 'l' .. b)
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0
end
local function slide(s, number, span)
  local v = redis.call('HMGET', s.key, 't', 'o', number)
  s.used, s.oldest, s.current = tonumber(v[1]) or 0, tonumber(v[2]), tonumber(v[3]) or 0
  while s.oldest and s.oldest <= number - span do
    local count, last = bucket_of(s, s.oldest)
    if last + s.window > now then s.first, s.first_count = last, count; return end  -- still counted
    s.used, s.dirty = s.used - count, true
    redis.call('HDEL', s.key, s.oldest, 'l' .. s.oldest)
    local b = s.oldest + 1
    s.oldest = nil
    while b <= number do  -- the next bucket with usage, if any
      if redis.call('HEXISTS', s.key, b) == 1 then s.oldest = b; break end
      b = b + 1
    end
  end
end
local states = {}
for j = 1, #KEYS do
  local kind, limit, window, bucket = string.match(ARGV[2 * j + 1], '^(%a)|(%d+)|(%d+)|(%d+)$')
  local name = KEYS[j]
  local s = {kind = kind, limit = tonumber(limit), cost = tonumber(ARGV[2 * j + 2]), key = name}
  window, bucket = tonumber(window), tonumber(bucket)
  if s.kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', name, '-inf', now)
    s.used, s.reset, s.ttl = redis.call('ZCARD', name), 1000, window
  elseif s.kind == 's' then
    s.window, s.ttl, s.number = window, window + 2 * bucket, math.floor(now / bucket)
    slide(s, s.number, window / bucket)
  else
    -- A calendar limit is one hash: n (the day or month it counts) and v (spent in it).
    if window == 0 then
      s.number, s.reset = month(now)
      s.ttl = s.reset + DAY
    else
      s.number = math.floor(now / window)
      s.reset, s.ttl = window - (now - s.number * window), 2 * window
    end
    local v = redis.call('HMGET', name, 'n', 'v')
    s.used = tonumber(v[1]) == s.number and tonumber(v[2]) or 0
  end
  s.fits = s.used + s.cost <= s.limit
  states[#states + 1] = s
end

-- ms until s lets the request in, no one else admitted meanwhile (when it fits: until the first
-- of its counted usage leaves; when it never can: until all of it has left).
local function reset(s, charged)
  if s.kind ~= 's' then return s.reset end
  local need = s.fits and 1 or s.used + s.cost - s.limit
  if need > s.used then need = s.used end
  if need == 0 then return (charged and s.cost > 0) and s.window or 0 end
  local freed = 0
  for b = s.oldest, s.number do
    local count, last = s.first_count, s.first
    if b ~= s.oldest or not last then count, last = bucket_of(s, b) end
    freed = freed + count
    if count > 0 and freed >= need then return last + s.window - now end
  end
end
-- Whether a holds the request back longer than b: a limit it can never fit, else the later wait.
local function later(a, b)
  local never_a, never_b = a.cost > a.limit, b.cost > b.limit
  if never_a ~= never_b then return never_a end
  return a.wait > b.wait
end

-- A refusal reports the limit that frees last: a retry at its reset is let in by every one.
local refused = 0
for i, s in ipairs(states) do
  if not s.fits then
    s.wait = reset(s, false)
    if refused == 0 or later(s, states[refused]) then refused = i end
  end
end

for _, s in ipairs(states) do
  if refused == 0 and s.kind == 'c' then
    redis.call('ZADD', s.key, now + s.ttl, member)
    redis.call('PEXPIRE', s.key, s.ttl)
  elseif refused == 0 and s.cost > 0 and s.kind == 's' then
    redis.call('HSET', s.key, 't', s.used + s.cost, 'o', s.oldest or s.number, s.number, s.current + s.cost,
      'l' .. s.number, now)
    redis.call('PEXPIRE', s.key, s.ttl)
  elseif refused == 0 and s.cost > 0 then
    redis.call('HSET', s.key, 'n', s.number, 'v', s.used + s.cost)
    redis.call('PEXPIREAT', s.key, now + s.ttl)
  elseif s.dirty then  -- buckets that left, dropped: the total and the oldest follow
    if s.oldest then redis.call('HSET', s.key, 't', s.used, 'o', s.oldest) else redis.call('DEL', s.key) end
  end
end

local out = {refused == 0 and 1 or 0, refused, refused > 0 and states[refused].wait or 0, now}
if report then
  for _, s in ipairs(states) do
    local cost = refused == 0 and s.cost or 0
    out[#out + 1] = math.max(0, s.limit - s.used - cost)
    out[#out + 1] = s.wait or reset(s, refused == 0)
  end
end
return out
