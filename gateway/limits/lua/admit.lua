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
-- When the usage in bucket j of sliding limit s leaves the window: a window after the bucket's
-- last charge, which the counter's expiry records (every charge sets it to that instant + ttl).
local function leaves(s, j)
  return redis.call('PEXPIRETIME', s.names[j]) - s.ttl + s.window
end
local states = {}
for i = 3, #ARGV, 2 do
  local kind, limit, window, bucket, name = string.match(ARGV[i], '^(%a)|(%d+)|(%d+)|(%d+)|(.*)$')
  local s = {kind = kind, limit = tonumber(limit), cost = tonumber(ARGV[i + 1])}
  window, bucket = tonumber(window), tonumber(bucket)
  if s.kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', name, '-inf', now)
    s.key, s.used, s.reset, s.ttl = name, redis.call('ZCARD', name), 1000, window
  elseif s.kind == 's' then
    -- The current bucket and a window's worth before it: a span that covers the last window.
    local number, span = math.floor(now / bucket), window / bucket
    local names = {}
    for b = number - span, number do names[#names + 1] = name .. ':' .. b end
    local counts = redis.call('MGET', unpack(names))
    s.used = 0
    for j = 1, #counts do
      counts[j] = tonumber(counts[j]) or 0
      s.used = s.used + counts[j]
    end
    s.key, s.ttl, s.window, s.names, s.counts = name .. ':' .. number, window + 2 * bucket, window, names, counts
    -- The oldest bucket straddles the window's start: whether its usage has left is read only
    -- where it matters (the remaining a key is told; a limit that is otherwise full).
    if counts[1] > 0 and (report or s.used + s.cost > s.limit) then
      s.first = leaves(s, 1)
      if s.first <= now then
        s.used, counts[1] = s.used - counts[1], 0
      end
    end
  else
    local number
    if window == 0 then
      number, s.reset = month(now)
      s.ttl = s.reset + DAY
    else
      number = math.floor(now / window)
      s.reset, s.ttl = window - (now - number * window), 2 * window
    end
    s.key = name .. ':' .. number
    s.used = tonumber(redis.call('GET', s.key) or '0')
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
  for j = 1, #s.counts do
    freed = freed + s.counts[j]
    if s.counts[j] > 0 and freed >= need then return (j == 1 and s.first or leaves(s, j)) - now end
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

if refused == 0 then
  for _, s in ipairs(states) do
    if s.kind == 'c' then
      redis.call('ZADD', s.key, now + s.ttl, member)
      redis.call('PEXPIRE', s.key, s.ttl)
    elseif s.cost > 0 then
      redis.call('INCRBY', s.key, s.cost)
      redis.call('PEXPIREAT', s.key, now + s.ttl)
    end
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
