-- campaign_settle.lua: settle a reservation made by campaign_reserve.lua: commit it (the upstream
-- accepted the message: it becomes counted sends) or release it (as if it never happened).
-- Idempotent: settling an unknown or already settled reservation changes nothing that counts.
--
-- KEYS[1..5] the campaign's "sent", "held", "resv", "resx", "bulk_until" keys, and KEYS[5+i] the
--          mail-bomb log of recipient i, exactly as passed to campaign_reserve.lua.
-- ARGV[1]  now: Unix seconds (float, as text) from the caller's clock; never the server's TIME.
-- ARGV[2]  reservation id.
-- ARGV[3]  "1" to commit, "0" to release.
-- ARGV[3+i] hash of recipient i, in the order of the reservation (checked against the record).
--
-- Writes:  removes the reservation (record, expiry, holds, "p:<id>" log members).  On commit of a
--          live reservation (now < expiry): every recipient counted in the bulk set gets score now
--          in "sent" (ZADD GT), every recipient's log gets "c:<id>" with score now, and bulk_until
--          becomes now + bulk_window if a recipient was past the threshold or the campaign is
--          still marked bulk.  Every key written gets PEXPIRE (the key ttl kept in the record).
-- Returns: integer 1 committed, 2 expired (not settled before its expiry: nothing counted),
--          3 released, 0 unknown (already settled, or expired and purged).

local now_s = ARGV[1]
local now = tonumber(now_s)
local id = ARGV[2]
local commit = ARGV[3] == '1'
local n = #KEYS - 5
if not now or id == nil or id == '' or (ARGV[3] ~= '1' and ARGV[3] ~= '0') or n < 1
    or #ARGV ~= 3 + n then
  return redis.error_reply('campaign_settle: bad KEYS/ARGV')
end
local SENT, HELD, RESV, RESX, BULK = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local UNKNOWN, COMMITTED, EXPIRED, RELEASED = 0, 1, 2, 3
local member = 'p:' .. id

local rec = redis.call('HGET', RESV, id)
if not rec then
  for i = 1, n do redis.call('ZREM', KEYS[5 + i], member) end
  return UNKNOWN
end
local r = cjson.decode(rec)
if #r.h ~= n then return redis.error_reply('campaign_settle: recipients do not match') end
for i = 1, n do
  if r.h[i] ~= ARGV[3 + i] then
    return redis.error_reply('campaign_settle: recipients do not match')
  end
end

redis.call('HDEL', RESV, id)
redis.call('ZREM', RESX, id)
for i = 1, n do
  if r.k[i] == 1 and redis.call('HINCRBY', HELD, r.h[i], -1) <= 0 then
    redis.call('HDEL', HELD, r.h[i])
  end
  redis.call('ZREM', KEYS[5 + i], member)
end
if not (now < tonumber(r.e)) then return EXPIRED end
if not commit then return RELEASED end

local key_ttl_ms = r.x
local past = false
for i = 1, n do
  if r.k[i] == 1 then
    redis.call('ZADD', SENT, 'GT', now_s, r.h[i])
  else
    past = true
  end
  redis.call('ZADD', KEYS[5 + i], now_s, 'c:' .. id)
  redis.call('PEXPIRE', KEYS[5 + i], key_ttl_ms)
end
local bulk_until = tonumber(redis.call('GET', BULK) or '')
if past or (bulk_until ~= nil and now < bulk_until) then
  local new_until = now + tonumber(r.w)
  if bulk_until == nil or new_until > bulk_until then
    redis.call('SET', BULK, string.format('%.17g', new_until), 'PX', key_ttl_ms)
  else
    redis.call('PEXPIRE', BULK, key_ttl_ms)
  end
end
for _, key in ipairs({SENT, HELD, RESV, RESX}) do redis.call('PEXPIRE', key, key_ttl_ms) end
return COMMITTED
