-- campaign_reserve.lua: decide one message of a campaign (bulk + mail bomb) and, only if every
-- recipient is allowed, reserve it.  All-or-nothing: one refused recipient, nothing reserved.
--
-- KEYS[1]  sorted set "sent": recipient hash -> time of its last committed send, for the
--          recipients counted in the bulk distinct set (keys: counting.CampaignKeys.sent).
-- KEYS[2]  hash "held": recipient hash -> number of live reservations holding it in the set.
-- KEYS[3]  hash "resv": reservation id -> JSON record {e = expiry (text), h = [hashes],
--          k = [1 counted in the set | 0 past the threshold], w = bulk window (text),
--          x = key ttl in ms (text), r = this script's return value (for replays)}.
-- KEYS[4]  sorted set "resx": reservation id -> expiry time (for lazy purging).
-- KEYS[5]  string "bulk_until": the campaign is bulk while now < this time (refreshed by commits).
-- KEYS[5+i] sorted set "mb" of recipient i: the mail-bomb log of this campaign to this recipient;
--          members "p:<id>" (reserved, counts while reservation <id> is live) and "c:<id>"
--          (committed), scores the reserve / commit times.
-- ARGV[1]  now: Unix seconds (float, as text) from the caller's clock; never the server's TIME.
-- ARGV[2]  reservation id (unique per message attempt; a replayed call returns the first answer).
-- ARGV[3]  bulk_recipients (int >= 0)    ARGV[4]  bulk_window (s > 0)
-- ARGV[5]  mailbomb_messages (int >= 0)  ARGV[6]  mailbomb_window (s > 0)
-- ARGV[7]  reservation_ttl (s > 0)
-- ARGV[6+2i] hash of recipient i (distinct within the call), ARGV[7+2i] "1" if recipient i is
--          excused from the bulk threshold (designated list server + confirmed opt-in), else "0".
--
-- Semantics:
--  * The bulk set is {recipients with a committed send in (now - bulk_window, ...]} U {recipients
--    held by a live reservation}.  A recipient already in it is SEEN (2); otherwise, while the set
--    has fewer than bulk_recipients members and the campaign is not marked bulk, it is NEW (1)
--    and joins the set; otherwise it is past the threshold: EXCUSED (3) if excused, else BULK (4),
--    refused, and it never joins the set (bounded memory).  Committing a reservation with a
--    recipient past the threshold, or any commit while bulk, sets bulk_until = now + bulk_window.
--  * Mail bomb: committed sends in (now - mailbomb_window, ...] plus live reservations, this
--    message included; above mailbomb_messages the recipient is MAILBOMB (5), excused or not.
--  * A reservation is live while now < its expiry (now + reservation_ttl at reserve time).
--
-- Writes:  always: purges reservations whose expiry <= now (un-holding their recipients), trims
--          entries older than the windows and stale "p:" members of the recipients' logs (dropping
--          only what no longer counts).  Only if every recipient is allowed: the reservation record,
--          its expiry, the holds, "p:<id>" (score now) in every recipient's log.  Every key written
--          gets PEXPIRE max(bulk_window, mailbomb_window) + reservation_ttl.
-- Returns: array {reserved (1|0), distinct, bulk (1|0), then per recipient: code, number, mb}
--          where distinct = the bulk set's size with this message's recipients (beyond the
--          threshold: at least bulk_recipients + the recipients past it), number = the recipient's
--          distinct number (0 if SEEN), mb = its mail-bomb count with this message.

local now_s = ARGV[1]
local now = tonumber(now_s)
local id = ARGV[2]
local bulk_max = tonumber(ARGV[3])
local bulk_window = tonumber(ARGV[4])
local mb_max = tonumber(ARGV[5])
local mb_window = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local n = #KEYS - 5
if not now or id == nil or id == '' or not bulk_max or bulk_max < 0 or not bulk_window
    or bulk_window <= 0 or not mb_max or mb_max < 0 or not mb_window or mb_window <= 0
    or not ttl or ttl <= 0 or n < 1 or #ARGV ~= 7 + 2 * n then
  return redis.error_reply('campaign_reserve: bad KEYS/ARGV')
end
local SENT, HELD, RESV, RESX, BULK = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local NEW, SEEN, EXCUSED, REFUSED_BULK, REFUSED_MAILBOMB = 1, 2, 3, 4, 5

-- %.17g keeps every bit of the double (Lua's default tostring keeps only 14 digits).
local function fmt(x) return string.format('%.17g', x) end
local key_ttl = math.max(bulk_window, mb_window) + ttl
local key_ttl_ms = string.format('%.0f', math.ceil(key_ttl * 1000))

local function unhold(h)
  if redis.call('HINCRBY', HELD, h, -1) <= 0 then redis.call('HDEL', HELD, h) end
end

-- 1. Lazily purge expired reservations: they no longer hold anything.
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', RESX, '-inf', now_s)) do
  local rec = redis.call('HGET', RESV, rid)
  if rec then
    local r = cjson.decode(rec)
    for j, h in ipairs(r.h) do
      if r.k[j] == 1 then unhold(h) end
    end
    redis.call('HDEL', RESV, rid)
  end
  redis.call('ZREM', RESX, rid)
end

-- 2. A replay of a call that reserved (a client-side retry): the same answer, nothing new.
local previous = redis.call('HGET', RESV, id)
if previous then return cjson.decode(previous).r end

-- 3. The bulk set as it stands.
redis.call('ZREMRANGEBYSCORE', SENT, '-inf', fmt(now - bulk_window))
local set_size = redis.call('ZCARD', SENT)
for _, h in ipairs(redis.call('HKEYS', HELD)) do
  if not redis.call('ZSCORE', SENT, h) then set_size = set_size + 1 end
end
local bulk_until = tonumber(redis.call('GET', BULK) or '')
local marked_bulk = bulk_until ~= nil and now < bulk_until

-- 4. Decide every recipient.
local mb_cutoff = fmt(now - mb_window)
local new, past = 0, 0
local allowed = true
local hashes, kinds, numbers, codes, counts = {}, {}, {}, {}, {}
local seen_in_call = {}
for i = 1, n do
  local h = ARGV[6 + 2 * i]
  if seen_in_call[h] then
    return redis.error_reply('campaign_reserve: duplicate recipient in one call')
  end
  seen_in_call[h] = true
  hashes[i] = h
  local code, number
  if redis.call('ZSCORE', SENT, h) or redis.call('HEXISTS', HELD, h) == 1 then
    code, number, kinds[i] = SEEN, 0, 1
  elseif not marked_bulk and set_size + new < bulk_max then
    new = new + 1
    code, number, kinds[i] = NEW, set_size + new, 1
  else
    past = past + 1
    number = math.max(set_size + new, bulk_max) + past
    kinds[i] = 0
    if ARGV[7 + 2 * i] == '1' then
      code = EXCUSED
    else
      code = REFUSED_BULK
    end
  end
  local log = KEYS[5 + i]
  redis.call('ZREMRANGEBYSCORE', log, '-inf', mb_cutoff)
  local count = 1 -- this message
  for _, m in ipairs(redis.call('ZRANGE', log, 0, -1)) do
    if string.sub(m, 1, 2) == 'c:' then
      count = count + 1
    else
      local expiry = redis.call('ZSCORE', RESX, string.sub(m, 3))
      if expiry and now < tonumber(expiry) then
        count = count + 1
      else
        redis.call('ZREM', log, m) -- its reservation expired or was settled
      end
    end
  end
  if count > mb_max then code = REFUSED_MAILBOMB end
  if code == REFUSED_BULK or code == REFUSED_MAILBOMB then allowed = false end
  codes[i], numbers[i], counts[i] = code, number, count
end

local distinct = set_size + new
if past > 0 then distinct = math.max(distinct, bulk_max) + past end
local result = {allowed and 1 or 0, distinct, (marked_bulk or past > 0) and 1 or 0}
for i = 1, n do
  result[#result + 1] = codes[i]
  result[#result + 1] = numbers[i]
  result[#result + 1] = counts[i]
end
if not allowed then return result end

-- 5. Reserve.
local expiry_s = fmt(now + ttl)
local member = 'p:' .. id
for i = 1, n do
  if kinds[i] == 1 then redis.call('HINCRBY', HELD, hashes[i], 1) end
  redis.call('ZADD', KEYS[5 + i], now_s, member)
  redis.call('PEXPIRE', KEYS[5 + i], key_ttl_ms)
end
redis.call('HSET', RESV, id, cjson.encode({
  e = expiry_s, h = hashes, k = kinds, w = fmt(bulk_window), x = key_ttl_ms, r = result}))
redis.call('ZADD', RESX, expiry_s, id)
for _, key in ipairs({HELD, RESV, RESX}) do redis.call('PEXPIRE', key, key_ttl_ms) end
return result
