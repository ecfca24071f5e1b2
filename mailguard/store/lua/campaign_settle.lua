-- campaign_settle.lua: settle a reservation made by campaign_reserve.lua: commit it (the upstream
-- accepted the message: it becomes counted sends) or release it (as if it never happened).
-- Idempotent: settling an unknown or already settled reservation changes nothing that counts.
--
-- KEYS[1..6] the campaign's "sent", "held", "pend", "resv", "resx", "bulk_until" keys, and
--          KEYS[6+i] the mail-bomb log of recipient i, exactly as passed to campaign_reserve.lua.
-- ARGV[1]  now: Unix seconds (float, as text) from the caller's clock; never the server's TIME.
-- ARGV[2]  reservation id.
-- ARGV[3]  "1" to commit, "0" to release.
-- ARGV[3+i] hash of recipient i, in the order of the reservation (checked against the record).
--
-- Writes:  removes the reservation (record, expiry, its holds in "held" and "pend").  On commit
--          of a live reservation (now < expiry): every recipient counted in the bulk set gets
--          score now in "sent" (ZADD GT), every recipient's log gets "c:<id>" with score now, and
--          bulk_until becomes now + bulk_window if a recipient was past the threshold or the
--          campaign is still marked bulk.  A commit also trims what has left the windows from
--          "sent" and from the logs it writes (so they stay bounded).  Every key written gets
--          PEXPIRE (the key ttl kept in the record).
-- Returns: integer 1 committed, 2 expired (not settled before its expiry: nothing counted),
--          3 released, 0 unknown (already settled, or expired and purged).

local now_s = ARGV[1]
local now = tonumber(now_s)
local id = ARGV[2]
local commit = ARGV[3] == '1'
local n = #KEYS - 6
if not now or id == nil or id == '' or (ARGV[3] ~= '1' and ARGV[3] ~= '0') or n < 1
    or #ARGV ~= 3 + n then
  return redis.error_reply('campaign_settle: bad KEYS/ARGV')
end
local SENT, HELD, PEND, RESV, RESX, BULK = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local UNKNOWN, COMMITTED, EXPIRED, RELEASED = 0, 1, 2, 3
local CHUNK = 1000
local function fmt(x) return string.format('%.17g', x) end

local rec = redis.call('HGET', RESV, id)
if not rec then return UNKNOWN end
-- The record (campaign_reserve.lua's header): compact (byte 2) or JSON.  hashes: the record's
-- recipient hashes, checked against ARGV; k[i]: 1 if recipient i is counted in the set.
local r, hashes, k
if string.byte(rec, 1) == 2 then
  local e, w, m, len, xlen, count, at = struct.unpack('>dddBBH', rec, 2)
  if count ~= n then return redis.error_reply('campaign_settle: recipients do not match') end
  hashes = {unpack(ARGV, 4, 3 + n)}
  at = at + xlen
  for i = 1, n do
    if #hashes[i] ~= len then
      return redis.error_reply('campaign_settle: recipients do not match')
    end
  end
  if string.sub(rec, at, at + n * len - 1) ~= table.concat(hashes) then
    return redis.error_reply('campaign_settle: recipients do not match')
  end
  k = {string.byte(rec, at + n * len, at + n * len + n - 1)}
  for i = 1, n do k[i] = k[i] == 49 and 1 or 0 end
  r = {e = e, w = w, m = m, x = string.sub(rec, at - xlen, at - 1)}
else
  r = cjson.decode(rec)
  if #r.h ~= n then return redis.error_reply('campaign_settle: recipients do not match') end
  for i = 1, n do
    if r.h[i] ~= ARGV[3 + i] then
      return redis.error_reply('campaign_settle: recipients do not match')
    end
  end
  hashes, k = r.h, r.k
end

-- Remove the reservation and its holds (one HMGET and at most one HSET and HDEL per hash).
-- (A record written before "pend" existed has no m; its holds were members "p:<id>" of the logs.)
if not r.m then
  for i = 1, n do redis.call('ZREM', KEYS[6 + i], 'p:' .. id) end
end
redis.call('HDEL', RESV, id)
redis.call('ZREM', RESX, id)
local function unhold(hash, hashes)
  if #hashes == 0 then return end
  local keep, drop = {}, {}
  for first = 1, #hashes, CHUNK do
    local last = math.min(#hashes, first + CHUNK - 1)
    local values = redis.call('HMGET', hash, unpack(hashes, first, last))
    for j = first, last do
      local left = (tonumber(values[j - first + 1]) or 0) - 1
      if left > 0 then
        keep[#keep + 1] = hashes[j]
        keep[#keep + 1] = left
      else
        drop[#drop + 1] = hashes[j]
      end
    end
  end
  for first = 1, #keep, CHUNK do
    redis.call('HSET', hash, unpack(keep, first, math.min(#keep, first + CHUNK - 1)))
  end
  for first = 1, #drop, CHUNK do
    redis.call('HDEL', hash, unpack(drop, first, math.min(#drop, first + CHUNK - 1)))
  end
end
local counted = {}
for i = 1, n do
  if k[i] == 1 then counted[#counted + 1] = hashes[i] end
end
unhold(HELD, counted)
unhold(PEND, hashes)
if not (now < tonumber(r.e)) then return EXPIRED end
if not commit then return RELEASED end

local key_ttl_ms = r.x
local past = #counted < n
local bulk_window = tonumber(r.w)
local bulk_cutoff = nil
if #counted > 0 then
  local pairs_ = {}
  for _, h in ipairs(counted) do
    pairs_[#pairs_ + 1] = now_s
    pairs_[#pairs_ + 1] = h
  end
  for first = 1, #pairs_, CHUNK do
    redis.call('ZADD', SENT, 'GT', unpack(pairs_, first, math.min(#pairs_, first + CHUNK - 1)))
  end
  bulk_cutoff = fmt(now - bulk_window)
  redis.call('ZREMRANGEBYSCORE', SENT, '-inf', bulk_cutoff)
  redis.call('PEXPIRE', SENT, key_ttl_ms)
end
local mb_window = tonumber(r.m or r.w)
local mb_cutoff = (mb_window == bulk_window and bulk_cutoff) or fmt(now - mb_window)
local member = 'c:' .. id
for i = 1, n do
  local log = KEYS[6 + i]
  redis.call('ZADD', log, now_s, member)
  redis.call('ZREMRANGEBYSCORE', log, '-inf', mb_cutoff)
  redis.call('PEXPIRE', log, key_ttl_ms)
end
local bulk_until = tonumber(redis.call('GET', BULK) or '')
if past or (bulk_until ~= nil and now < bulk_until) then
  local new_until = now + bulk_window
  if bulk_until == nil or new_until > bulk_until then
    redis.call('SET', BULK, fmt(new_until), 'PX', key_ttl_ms)
  else
    redis.call('PEXPIRE', BULK, key_ttl_ms)
  end
end
return COMMITTED
