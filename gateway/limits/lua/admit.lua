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

local member, alternatives, free = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local states = {}
for i = 4, #ARGV, 3 do
  local kind, limit, window, bucket, name = string.match(ARGV[i + 1], '^(%a)|(%d+)|(%d+)|(%d+)|(.*)$')
  local s = {group = tonumber(ARGV[i]), kind = kind, limit = tonumber(limit), cost = tonumber(ARGV[i + 2])}
  window, bucket = tonumber(window), tonumber(bucket)
  local base = KEYS[1] .. ':' .. name
  if s.kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', base, '-inf', now)
    s.key, s.used, s.reset, s.ttl = base, redis.call('ZCARD', base), 1000, window
  elseif s.kind == 's' then
    -- The current bucket and a window's worth before it: a span that covers the last window.
    local number, span = math.floor(now / bucket), window / bucket
    local names = {}
    for b = number - span, number do names[#names + 1] = base .. ':' .. b end
    local counts = redis.call('MGET', unpack(names))
    s.used = 0
    for j = 1, #counts do
      counts[j] = tonumber(counts[j]) or 0
      s.used = s.used + counts[j]
    end
    local need, freed = math.max(s.used + s.cost - s.limit, 1), 0
    s.key, s.reset, s.ttl = base .. ':' .. number, window + bucket, window + 2 * bucket
    for j = 1, #counts do
      freed = freed + counts[j]
      if counts[j] > 0 and freed >= need then
        s.reset = (number + j) * bucket - now
        break
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
    s.key = base .. ':' .. number
    s.used = tonumber(redis.call('GET', s.key) or '0')
  end
  s.fits = s.used + s.cost <= s.limit
  states[#states + 1] = s
end

local refused, reset, chosen = 0, 0, 0
for i, s in ipairs(states) do
  if s.group == 0 and not s.fits then refused, reset = i, s.reset; break end
end
if refused == 0 and alternatives > 0 then
  local full = {}
  for _, s in ipairs(states) do
    if s.group > 0 and not s.fits then full[s.group] = true end
  end
  for g = 1, alternatives do
    if not full[g] then chosen = g; break end
  end
  if chosen == 0 and free == 0 then
    for i, s in ipairs(states) do
      if s.group > 0 and not s.fits and (refused == 0 or s.reset < reset) then refused, reset = i, s.reset end
    end
  end
end

if refused == 0 then
  for _, s in ipairs(states) do
    if s.group == 0 or s.group == chosen then
      if s.kind == 'c' then
        redis.call('ZADD', s.key, now + s.ttl, member)
        redis.call('PEXPIRE', s.key, s.ttl)
      elseif s.cost > 0 then
        redis.call('INCRBY', s.key, s.cost)
        redis.call('PEXPIRE', s.key, s.ttl)
      end
    end
  end
end

local out = {refused == 0 and 1 or 0, refused, reset, chosen, now}
for _, s in ipairs(states) do
  if s.group == 0 then
    local cost = refused == 0 and s.cost or 0
    out[#out + 1] = math.max(0, s.limit - s.used - cost)
    out[#out + 1] = s.reset
  end
end
return out
