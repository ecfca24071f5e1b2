-- auth_failures_count.lua: count the failed SMTP AUTHs of a client within the window (read only).
--
-- KEYS[1]  sorted set written by auth_failure.lua (keys.Keys.auth_failures).
-- ARGV[1]  now: Unix seconds (float, as text) from the caller's clock; never the server's TIME.
-- ARGV[2]  window: seconds (float > 0); the window is (now - window, now].
--
-- Writes:  nothing.
-- Returns: integer, the number of entries with score in (now - window, now]
--          (0 if the key does not exist).

local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
if not now or not window or window <= 0 then
  return redis.error_reply('auth_failures_count: bad ARGV (now, window > 0)')
end
local cutoff = string.format('%.17g', now - window)
return redis.call('ZCOUNT', KEYS[1], '(' .. cutoff, ARGV[1])
