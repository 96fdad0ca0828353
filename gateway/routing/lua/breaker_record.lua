-- Add outcomes to the rolling window of a closed breaker; open it at the threshold.
-- KEYS: state, window, lease. ARGV: failures, calls, window_ms, bucket_ms, threshold,
-- failure rate (0: off), min_calls, base cooldown_ms. With no outcomes it only reads.
-- The window is one string of "<bucket start ms>:<failures>:<calls>" entries, oldest dropped.
local now = now_ms()
local st = load_state(KEYS[1], now, tonumber(ARGV[8]))
if st.state ~= 'closed' then
  return reply(0, st, now, 0, 0, KEYS[3])
end
local fails, calls = tonumber(ARGV[1]), tonumber(ARGV[2])
local window, bucket = tonumber(ARGV[3]), tonumber(ARGV[4])
local current = now - now % bucket
local kept, total_fails, total_calls, found = {}, 0, 0, false
for entry_start, entry_fails, entry_calls in string.gmatch(redis.call('GET', KEYS[2]) or '', '(%d+):(%d+):(%d+)') do
  local s, f, c = tonumber(entry_start), tonumber(entry_fails), tonumber(entry_calls)
  if s == current then
    f, c, found = f + fails, c + calls, true
  end
  if s > now - window then
    total_fails, total_calls = total_fails + f, total_calls + c
    kept[#kept + 1] = string.format('%d:%d:%d', s, f, c)
  end
end
if not found then
  total_fails, total_calls = total_fails + fails, total_calls + calls
  kept[#kept + 1] = string.format('%d:%d:%d', current, fails, calls)
end
if fails == 0 and calls == 0 then
  return reply(0, st, now, total_fails, total_calls, KEYS[3])
end
local rate = tonumber(ARGV[6])
if fails > 0 and (total_fails >= tonumber(ARGV[5])
    or (rate > 0 and total_calls >= tonumber(ARGV[7]) and total_fails >= rate * total_calls)) then
  save_state(KEYS[1], st, 'open', now, now, tonumber(ARGV[8]))
  redis.call('DEL', KEYS[2])
  return reply(1, st, now, total_fails, total_calls, KEYS[3])
end
redis.call('SET', KEYS[2], table.concat(kept, ','), 'PX', window + bucket)
return reply(0, st, now, total_fails, total_calls, KEYS[3])
