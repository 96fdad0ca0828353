-- End a half-open breaker's probe, or reset any breaker.
-- KEYS: state, lease, window. ARGV: 'success' | 'failure' | 'reset', base cooldown_ms, max cooldown_ms.
-- A probe's result arriving when the breaker is no longer half-open changes nothing.
local now = now_ms()
local base = tonumber(ARGV[2])
local st = load_state(KEYS[1], now, base)
if ARGV[1] ~= 'reset' and st.state ~= 'half_open' then
  return reply(0, st, now, 0, 0, KEYS[2])
end
redis.call('DEL', KEYS[2], KEYS[3])
if ARGV[1] == 'failure' then
  save_state(KEYS[1], st, 'open', now, now, math.min(st.cooldown * 2, tonumber(ARGV[3])))
else
  save_state(KEYS[1], st, 'closed', now, 0, base)
end
return reply(1, st, now, 0, 0, KEYS[2])
