-- Grant the one probe of a breaker whose cooldown is over, to exactly one caller.
-- KEYS: state, lease. ARGV: lease_ms, base cooldown_ms.
-- Flag: 1 granted (now half-open), 2 granted again after a lost probe's lease ran out, 0 not granted.
local now = now_ms()
local st = load_state(KEYS[1], now, tonumber(ARGV[2]))
if st.state == 'closed' or (st.state == 'open' and now < st.opened + st.cooldown) then
  return reply(0, st, now, 0, 0, KEYS[2])
end
-- The lease bounds the probe: if its replica dies before reporting, another may go.
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  return reply(0, st, now, 0, 0, KEYS[2])
end
if st.state == 'half_open' then
  return reply(2, st, now, 0, 0, KEYS[2])
end
save_state(KEYS[1], st, 'half_open', now, st.opened, st.cooldown)
return reply(1, st, now, 0, 0, KEYS[2])
