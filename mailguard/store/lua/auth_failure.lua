-- auth_failure.lua: record one failed SMTP AUTH from a client; count failures in the window.
--
-- KEYS[1]  sorted set: sliding-window log of failures of one client address
--          (keys.Keys.auth_failures); members are unique ids, scores the failure times.
-- ARGV[1]  now: Unix seconds (float, as text) from the caller's clock; never the server's TIME.
-- ARGV[2]  window: seconds (float > 0); the window is (now - window, now].
-- ARGV[3]  member: an id unique to this attempt, so equal timestamps do not collapse into one
--          entry, and a client-side retry of the same call is idempotent.
--
-- Writes:  removes entries with score <= now - window, adds (now, member),
--          sets PEXPIRE KEYS[1] to the window (rounded up to whole milliseconds).
-- Returns: integer, the number of entries with score in (now - window, now], this one included.

local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
if not now or not window or window <= 0 then
  return redis.error_reply('auth_failure: bad ARGV (now, window > 0, member)')
end
-- %.17g keeps every bit of the double (Lua's default tostring keeps only 14 digits).
local cutoff = string.format('%.17g', now - window)

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', math.ceil(window * 1000)))
return redis.call('ZCOUNT', KEYS[1], '(' .. cutoff, ARGV[1])
