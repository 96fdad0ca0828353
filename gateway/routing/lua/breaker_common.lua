-- Prepended to every breaker script (gateway/breaker.py): the clock, the state record, the reply.
-- The state key holds "<state> <version> <opened_at_ms> <cooldown_ms>"; a missing key is a
-- closed breaker whose version is the current time, so a store that lost its data still
-- outranks what replicas remember. Every transition raises the version past both the old
-- one and the clock, so replicas order the messages they receive by it.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function load_state(key, now, base_cooldown)
  local raw = redis.call('GET', key)
  if not raw then
    return {state = 'closed', version = now, opened = 0, cooldown = base_cooldown}
  end
  local s, v, o, c = string.match(raw, '^(%S+) (%d+) (%d+) (%d+)$')
  return {state = s, version = tonumber(v), opened = tonumber(o), cooldown = tonumber(c)}
end

local function save_state(key, st, state, now, opened, cooldown)
  st.state, st.version = state, math.max(st.version + 1, now + 1)
  st.opened, st.cooldown = opened, cooldown
  redis.call('SET', key, string.format('%s %d %d %d', state, st.version, opened, cooldown))
end

-- {flag, state, version, opened_at_ms, cooldown_ms, ms until a probe may go, failures, calls}
local function reply(flag, st, now, fails, calls, lease)
  local remaining = 0
  if st.state == 'open' then
    remaining = math.max(0, st.opened + st.cooldown - now)
  elseif st.state == 'half_open' then
    remaining = math.max(0, redis.call('PTTL', lease))
  end
  return {flag, st.state, st.version, st.opened, st.cooldown, remaining, fails, calls}
end
