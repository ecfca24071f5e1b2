-- optin_write.lua: compare-and-set opt-in records of one customer's list, refresh retention.
--
-- KEYS[1]  hash: the list's records, recipient -> record JSON (OptInStore.list_key).
-- KEYS[2]  set: the customer's list ids, "" for the default list (OptInStore.lists_key).
--          Both keys carry the customer's hash tag (one slot on Redis Cluster).
-- ARGV[1]  list id: the member of KEYS[2] naming this list.
-- ARGV[2]  retention: milliseconds (integer > 0) the keys live after this write.
-- ARGV[3..] triples (recipient, expected, new): expected is the record JSON the caller read,
--          "" when there was none (no stored record is ever ""); new is the JSON to store.
--
-- Writes:  only if every recipient's current value equals its expected value: HSET of each
--          new value; then, if KEYS[1] exists, SADD ARGV[1] to KEYS[2] and PEXPIRE of both
--          keys to the retention (also with no triples: an import that changes nothing still
--          refreshes the retention of a list it touches).  Nothing at all on a mismatch.
-- Returns: array of the 1-based numbers of the triples whose expected value did not match
--          (empty: all written); the caller re-reads those and tries again.

local retention = tonumber(ARGV[2])
if not retention or retention <= 0 or (#ARGV - 2) % 3 ~= 0 then
  return redis.error_reply('optin_write: bad ARGV (list id, retention ms > 0, triples)')
end

local mismatched = {}
for i = 3, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current == false then
    current = ''
  end
  if current ~= ARGV[i + 1] then
    mismatched[#mismatched + 1] = (i - 3) / 3 + 1
  end
end
if #mismatched > 0 then
  return mismatched
end

for i = 3, #ARGV, 3 do
  if ARGV[i + 1] ~= ARGV[i + 2] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return mismatched
