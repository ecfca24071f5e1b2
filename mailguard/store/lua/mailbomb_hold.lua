-- mailbomb_hold.lua: after an enforced mail-bomb refusal at end of DATA, remember per recipient
-- that RCPT TO from the same envelope sender is to be deferred until the hold ends
-- (store/holds.py; the rule is core/rules/campaign.hold_verdict).
--
-- KEYS[2i-1] string "mbhold" of (customer, envelope sender, recipient i): the hold.
-- KEYS[2i]   sorted set "mb" of the refused campaign and recipient i: its mail-bomb log of
--            committed sends (campaign_reserve.lua's KEYS[6+i]; read only).
-- KEYS[#KEYS] string "mbhold:any" of the customer: set while any of its holds may live (readers
--            skip the per-recipient reads while it is absent; store/holds.py).
-- ARGV[1]  now: Unix seconds (float, as text) from the caller's clock; never the server's TIME.
-- ARGV[2]  hold: the longest the hold may last (s > 0; [policy] mailbomb_hold).
-- ARGV[3]  mailbomb_window (s > 0)   ARGV[4]  mailbomb_messages (int >= 0)
-- ARGV[5]  the refused message's campaign id.
-- ARGV[5+i] the refused message's number to recipient i (its mail-bomb count).
--
-- The hold of recipient i ends at until = min(now + hold, free), where free is the moment a copy
-- of the campaign would be accepted again as far as committed sends go: with k committed sends
-- in (now - window, ...] and s_j the j-th oldest, a copy at time t needs fewer than
-- mailbomb_messages of them in (t - window, ...], so free = s_(k - mailbomb_messages + 1) +
-- window.  Live reservations only add to the count, so until that moment every copy is refused.
-- With fewer than mailbomb_messages committed sends (the refusal counted live reservations,
-- which may still be released) nothing is held.
-- Writes:  KEYS[2i-1] = {"c": campaign, "n": number, "t": mailbomb_messages, "w": window,
--          "u": until, "a": now} (JSON, times as %.17g) with PX until the hold ends, replacing
--          any earlier hold of that sender and recipient; nothing if until <= now.
-- Returns: array of until per recipient (text, %.17g), "0" where nothing was held.

local now = tonumber(ARGV[1])
local hold = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local max = tonumber(ARGV[4])
local campaign = ARGV[5]
local n = (#KEYS - 1) / 2
local marker = KEYS[#KEYS]
local marker_ms = 0
if not now or not hold or hold <= 0 or not window or window <= 0 or not max or max < 0
    or campaign == nil or campaign == '' or n < 1 or n % 1 ~= 0
    or #ARGV ~= 5 + n then
  return redis.error_reply('mailbomb_hold: bad KEYS/ARGV')
end
local function fmt(x) return string.format('%.17g', x) end

local from = '(' .. fmt(now - window)
local out = {}
for i = 1, n do
  local number = tonumber(ARGV[5 + i])
  if not number then return redis.error_reply('mailbomb_hold: bad KEYS/ARGV') end
  local log = KEYS[2 * i]
  local k = redis.call('ZCOUNT', log, from, '+inf')
  local free = nil
  if max == 0 then
    free = now + hold
  elseif k >= max then
    local entry = redis.call('ZRANGEBYSCORE', log, from, '+inf', 'WITHSCORES', 'LIMIT', k - max, 1)
    if entry[2] then free = tonumber(entry[2]) + window end
  end
  local until_ = 0
  if free then until_ = math.min(now + hold, free) end
  if until_ > now then
    local value = string.format('{"c":%s,"n":%d,"t":%d,"w":%s,"u":%s,"a":%s}',
      cjson.encode(campaign), number, max, fmt(window), fmt(until_), fmt(now))
    local ms = math.max(1, math.ceil((until_ - now) * 1000))
    redis.call('SET', KEYS[2 * i - 1], value, 'PX', string.format('%.0f', ms))
    if ms > marker_ms then marker_ms = ms end
    out[i] = fmt(until_)
  else
    out[i] = '0'
  end
end
if marker_ms > 0 and redis.call('PTTL', marker) < marker_ms then
  redis.call('SET', marker, '1', 'PX', string.format('%.0f', marker_ms))
end
return out
