-- campaign_reserve.lua: decide one message of a campaign (bulk + mail bomb) and, only if every
-- recipient is allowed, reserve it.  All-or-nothing: one refused recipient, nothing reserved;
-- except that refusals of a rule the caller monitors (ARGV[8]: the message is sent anyway) do
-- not stop the reservation, so a monitored message counts when it is sent.
-- Also the body of a function in campaign_decide (counting.decide_script): it uses only its
-- KEYS and ARGV and returns its result (errors as an error table).
--
-- KEYS[1]  sorted set "sent": recipient hash -> time of its last committed send, for the
--          recipients counted in the bulk distinct set (keys: counting.CampaignKeys.sent).
--          Entries older than the bulk window are ignored here and trimmed by commits.  Read
--          whole (ZRANGEBYSCORE) when fewer than 128 are in the window, else ZCOUNT + ZMSCORE.
-- KEYS[2]  hash "held": recipient hash -> number of live reservations holding it in the set.
-- KEYS[3]  hash "pend": recipient hash -> number of live reservations to it (every recipient of
--          a reservation, in the set or past the threshold): the mail-bomb rule's holds.
-- KEYS[4]  hash "resv": reservation id -> record of: e = expiry, h = the recipient hashes,
--          k = per hash 1 counted in the set | 0 past the threshold, w = bulk window,
--          m = mail-bomb window, x = key ttl in ms (text), r = this script's return value (for
--          replays).  Written as byte 2, struct '>dddBBH' (e, w, m, hash length L, #x, n), x,
--          the n hashes concatenated (L bytes each), k as n characters '1' | '0', then r as
--          struct '>d' each; or, when the hashes differ in length, L or #x is over 255 or n
--          over 1000, as the JSON object {e, h, k, w, m, x, r} with e, w, m as text (also the
--          only form written before; both are read, by this script and campaign_settle.lua).
-- KEYS[5]  sorted set "resx": reservation id -> expiry time (for lazy purging).
-- KEYS[6]  string "bulk_until": the campaign is bulk while now < this time (refreshed by commits).
-- KEYS[6+i] sorted set "mb" of recipient i: the mail-bomb log of this campaign to this recipient,
--          committed sends only: member "c:<id>", score the commit time.  Read with one ZCOUNT;
--          trimmed by commits.
-- ARGV[1]  now: Unix seconds (float, as text) from the caller's clock; never the server's TIME.
-- ARGV[2]  reservation id (unique per message attempt; a replayed call returns the first answer).
-- ARGV[3]  bulk_recipients (int >= 0)    ARGV[4]  bulk_window (s > 0)
-- ARGV[5]  mailbomb_messages (int >= 0)  ARGV[6]  mailbomb_window (s > 0)
-- ARGV[7]  reservation_ttl (s > 0)
-- ARGV[8]  monitored rules (int 0..3): + 1 if bulk refusals are only monitored, + 2 if mail-bomb
--          refusals are (the caller sends such a message anyway, so it must be reserved).
-- ARGV[7+2i] hash of recipient i (distinct within the call), ARGV[8+2i] "1" if recipient i is
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
--  * Monitored rules: the message is reserved when every recipient is allowed or refused only
--    by monitored rules (a recipient past the bulk threshold and not excused counts as a bulk
--    refusal even when it is also a mail bomb).  Its codes are reported as without ARGV[8]; a
--    bulk-refused recipient so reserved is held like an EXCUSED one (past the threshold: it
--    does not join the set, and committing marks the campaign bulk).
--
-- Writes:  always: purges reservations whose expiry <= now (un-holding their recipients in "held"
--          and "pend").  Only if the message is reserved (above): the reservation record, its expiry,
--          the holds ("held" for recipients in the set, "pend" for all).  No per-recipient key is
--          written.  Every key written gets PEXPIRE max(bulk_window, mailbomb_window) +
--          reservation_ttl.
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
local monitored = tonumber(ARGV[8])
local n = #KEYS - 6
if not now or id == nil or id == '' or not bulk_max or bulk_max < 0 or not bulk_window
    or bulk_window <= 0 or not mb_max or mb_max < 0 or not mb_window or mb_window <= 0
    or not ttl or ttl <= 0 or not monitored or monitored < 0 or monitored > 3 or n < 1
    or #ARGV ~= 8 + 2 * n then
  return redis.error_reply('campaign_reserve: bad KEYS/ARGV')
end
local SENT, HELD, PEND, RESV, RESX, BULK = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local NEW, SEEN, EXCUSED, REFUSED_BULK, REFUSED_MAILBOMB = 1, 2, 3, 4, 5
local monitor_bulk, monitor_mailbomb = monitored % 2 == 1, monitored >= 2
local CHUNK = 1000 -- arguments unpacked onto Lua's C stack at a time

-- %.17g keeps every bit of the double (Lua's default tostring keeps only 14 digits).
local function fmt(x) return string.format('%.17g', x) end
local key_ttl = math.max(bulk_window, mb_window) + ttl
local key_ttl_ms = string.format('%.0f', math.ceil(key_ttl * 1000))

-- redis.call(cmd, key, list...) in chunks; the replies concatenated (for ZMSCORE / HMGET).
local function call_list(cmd, key, list)
  local out = {}
  for first = 1, #list, CHUNK do
    local part = redis.call(cmd, key, unpack(list, first, math.min(#list, first + CHUNK - 1)))
    for _, v in ipairs(part) do out[#out + 1] = v end
  end
  return out
end

local function unhold(hash, h)
  if redis.call('HINCRBY', hash, h, -1) <= 0 then redis.call('HDEL', hash, h) end
end

-- A reservation record (KEYS[4]): {e, w, m (numbers or text), x, h, k, r} as stored.
local function decode(rec)
  if string.byte(rec, 1) ~= 2 then return cjson.decode(rec) end
  local e, w, m, len, xlen, count, at = struct.unpack('>dddBBH', rec, 2)
  local r = {e = e, w = w, m = m, x = string.sub(rec, at, at + xlen - 1), h = {}, k = {}}
  at = at + xlen
  for i = 1, count do r.h[i] = string.sub(rec, at + (i - 1) * len, at + i * len - 1) end
  at = at + count * len
  for i = 1, count do r.k[i] = string.byte(rec, at + i - 1) == 49 and 1 or 0 end
  at = at + count
  r.r = {struct.unpack('>' .. string.rep('d', 3 + 3 * count), rec, at)}
  r.r[4 + 3 * count] = nil -- struct.unpack's next position
  return r
end

-- 1. Lazily purge expired reservations: they no longer hold anything.
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', RESX, '-inf', now_s)) do
  local rec = redis.call('HGET', RESV, rid)
  if rec then
    local r = decode(rec)
    for j, h in ipairs(r.h) do
      if r.k[j] == 1 then unhold(HELD, h) end
      unhold(PEND, h)
    end
    redis.call('HDEL', RESV, rid)
  end
  redis.call('ZREM', RESX, rid)
end

-- 2. A replay of a call that reserved (a client-side retry): the same answer, nothing new.
local previous = redis.call('HGET', RESV, id)
if previous then return decode(previous).r end

-- 3. The bulk set as it stands: sends in the window, plus held recipients without one.  The
-- recipients sent to within the window are read whole when there are fewer than READ_WHOLE (the
-- common case: normally at most bulk_recipients), so membership is a table lookup; otherwise
-- they are counted and looked up by score (ZMSCORE), as many as asked about.
local bulk_cutoff = now - bulk_window
local bulk_from = '(' .. fmt(bulk_cutoff)
local READ_WHOLE = 128
local window = redis.call('ZRANGEBYSCORE', SENT, bulk_from, '+inf', 'LIMIT', 0, READ_WHOLE)
local in_window, set_size = nil, #window
if set_size < READ_WHOLE then
  in_window = {}
  for _, h in ipairs(window) do in_window[h] = true end
else
  set_size = redis.call('ZCOUNT', SENT, bulk_from, '+inf')
end
-- Per hash of list: true if it has a committed send within the bulk window.
local function sent_in_window(list)
  local out = {}
  if in_window then
    for j = 1, #list do out[j] = in_window[list[j]] == true end
    return out
  end
  local scores = call_list('ZMSCORE', SENT, list)
  for j = 1, #list do
    local s = scores[j] and tonumber(scores[j])
    out[j] = (s and s > bulk_cutoff) == true
  end
  return out
end
local held_all = redis.call('HGETALL', HELD) -- {hash, count, ...}
local held_count = {}
if #held_all > 0 then
  local held_keys = {}
  for j = 1, #held_all, 2 do
    held_keys[#held_keys + 1] = held_all[j]
    held_count[held_all[j]] = held_all[j + 1]
  end
  local sent = sent_in_window(held_keys)
  for j = 1, #held_keys do
    if not sent[j] then set_size = set_size + 1 end
  end
end
local bulk_until = tonumber(redis.call('GET', BULK) or '')
local marked_bulk = bulk_until ~= nil and now < bulk_until

-- 4. Decide every recipient.  result: {reserved, distinct, bulk, then code, number, count per
-- recipient}; kinds[i]: 1 if recipient i is (or joins) the set, 0 if past the threshold.
local hashes = {}
local seen_in_call = {}
for i = 1, n do
  local h = ARGV[7 + 2 * i]
  if seen_in_call[h] then
    return redis.error_reply('campaign_reserve: duplicate recipient in one call')
  end
  seen_in_call[h] = true
  hashes[i] = h
end
local sent = sent_in_window(hashes)
local pend = call_list('HMGET', PEND, hashes)
local mb_from = mb_window == bulk_window and bulk_from or '(' .. fmt(now - mb_window)
local new, past = 0, 0
local reservable = true
local kinds = {}
local result = {0, 0, 0}
for i = 1, n do
  local code, number
  if sent[i] or held_count[hashes[i]] then
    code, number, kinds[i] = SEEN, 0, 1
  elseif not marked_bulk and set_size + new < bulk_max then
    new = new + 1
    code, number, kinds[i] = NEW, set_size + new, 1
  else
    past = past + 1
    number = math.max(set_size + new, bulk_max) + past
    kinds[i] = 0
    if ARGV[8 + 2 * i] == '1' then
      code = EXCUSED
    else
      code = REFUSED_BULK
      if not monitor_bulk then reservable = false end
    end
  end
  -- committed sends in the window + live reservations + this message
  local count = redis.call('ZCOUNT', KEYS[6 + i], mb_from, '+inf') + (tonumber(pend[i]) or 0) + 1
  if count > mb_max then
    code = REFUSED_MAILBOMB
    if not monitor_mailbomb then reservable = false end
  end
  result[3 * i + 1], result[3 * i + 2], result[3 * i + 3] = code, number, count
end

local distinct = set_size + new
if past > 0 then distinct = math.max(distinct, bulk_max) + past end
result[1], result[2], result[3] = reservable and 1 or 0, distinct, (marked_bulk or past > 0) and 1 or 0
if not reservable then return result end

-- 5. Reserve: the holds (one HSET per hash), the record and its expiry.
local held_set, pend_set = {}, {}
for i = 1, n do
  if kinds[i] == 1 then
    held_set[#held_set + 1] = hashes[i]
    held_set[#held_set + 1] = (tonumber(held_count[hashes[i]]) or 0) + 1
  end
  pend_set[#pend_set + 1] = hashes[i]
  pend_set[#pend_set + 1] = (tonumber(pend[i]) or 0) + 1
end
for first = 1, #held_set, CHUNK do
  redis.call('HSET', HELD, unpack(held_set, first, math.min(#held_set, first + CHUNK - 1)))
end
for first = 1, #pend_set, CHUNK do
  redis.call('HSET', PEND, unpack(pend_set, first, math.min(#pend_set, first + CHUNK - 1)))
end
local expiry = now + ttl
local expiry_s = fmt(expiry)
local len = #hashes[1]
local compact = len <= 255 and n <= 1000 and #key_ttl_ms <= 255
for i = 2, n do
  if #hashes[i] ~= len then compact = false break end
end
local record
if compact then
  local ks = {}
  for i = 1, n do ks[i] = kinds[i] == 1 and '1' or '0' end
  record = '\2' .. struct.pack('>dddBBH', expiry, bulk_window, mb_window, len, #key_ttl_ms, n)
      .. key_ttl_ms .. table.concat(hashes) .. table.concat(ks)
      .. struct.pack('>' .. string.rep('d', #result), unpack(result))
else
  record = cjson.encode({e = expiry_s, h = hashes, k = kinds, w = fmt(bulk_window),
                         m = fmt(mb_window), x = key_ttl_ms, r = result})
end
redis.call('HSET', RESV, id, record)
redis.call('ZADD', RESX, expiry_s, id)
if #held_set > 0 then redis.call('PEXPIRE', HELD, key_ttl_ms) end
redis.call('PEXPIRE', PEND, key_ttl_ms)
redis.call('PEXPIRE', RESV, key_ttl_ms)
redis.call('PEXPIRE', RESX, key_ttl_ms)
return result
