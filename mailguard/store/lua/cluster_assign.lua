-- cluster_assign.lua: assign one message (its fingerprint) of a customer to a cluster ("campaign"):
-- the id of an earlier similar message within the window, or a newly founded one.  Implements
-- exactly the algorithm of mailguard/core/fingerprint/cluster.py (ClusterIndex.assign, whose
-- module docstring is normative), atomically, so concurrent gates never split a new campaign.
--
-- KEYS[1]  hash "rec": cluster id -> record = struct '>dd' (created, last_seen) .. rep, where rep
--          is the founding fingerprint's Fingerprint.to_bytes() (260 or 12 bytes).
-- KEYS[2]  sorted set "seen": cluster id -> last_seen (the same double as in the record); used
--          only to find dead clusters to delete.
-- KEYS[3..] one string "b:<band key>" per band key of the fingerprint, in band_keys() order
--          (32 for a sketch, 1 for an exact fingerprint): struct '>d' (touched) .. the bucket's
--          cluster ids concatenated (16 characters each), most recently used first.
-- ARGV[1]  now: Unix seconds (float, as text) from the caller's clock; never the server's TIME.
-- ARGV[2]  window: seconds (float > 0).  A cluster is alive iff now - last_seen <= window, a
--          bucket iff now - touched <= window (double arithmetic, as in Python).
-- ARGV[3]  the fingerprint: Fingerprint.to_bytes() (version, kind 1 sketch | 2 exact, uint16
--          words, then 256 lane bytes or an 8-byte digest).
-- ARGV[4]  need: equal lanes needed for a match (integer 0..129): ceil(threshold * 128), clamped.
--          Equal lanes: sketches: equal 16-bit lanes; exact: 128 if the digests are equal, else
--          0; different kinds: 0.  So "equal >= need" is exactly "similarity >= threshold".
-- ARGV[5]  new id: new_cluster_id(fp, now), 16 characters; used only if a cluster is founded.
-- ARGV[6]  bucket_cap (int >= 1)   ARGV[7]  max_candidates (int >= 1)
-- ARGV[8]  purge: at most this many dead clusters (int >= 0) are deleted by this call.
--
-- Algorithm (cluster.py): votes from the alive buckets for alive clusters; candidates ordered by
-- (more votes, earlier created, smaller id), the first max_candidates verified against their rep;
-- the best match (most equal lanes, earlier created, smaller id) wins: its last_seen becomes
-- max(last_seen, now) and in every alive bucket holding it, it moves to the front and touched =
-- max(touched, now).  With no match a cluster is founded: record (fp, now, now) under the new id
-- (replacing any), and in every bucket: dead clusters and the new id dropped (all of a dead
-- bucket), the new id put in front, the first bucket_cap kept, touched = max(touched, now).
--
-- Writes:  first deletes up to ARGV[8] dead clusters (lowest last_seen first) from "rec" and
--          "seen" (never a live one: each is checked with the exact rule).  On a match: the
--          winner's record and score if last_seen grows; each bucket holding it whose order or
--          touched changes.  On founding: the record, its score, every bucket of KEYS[3..].
--          Every bucket written gets PX window (rounded up to whole ms); "rec" and "seen" get
--          PEXPIRE window on every call.  Dead clusters' bucket entries are never looked up
--          again: they go when the bucket is next rebuilt or expires.
-- Returns: array {cluster id, 1 if founded by this call else 0}.

local now_s, window_s, fp = ARGV[1], ARGV[2], ARGV[3]
local now, window = tonumber(now_s), tonumber(window_s)
local need, new_id = tonumber(ARGV[4]), ARGV[5]
local cap, max_cand, purge = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ID_LEN, LANES = 16, 128
local nb = #KEYS - 2
local kind = fp and string.byte(fp, 2)
if #ARGV ~= 8 or not now or not window or window <= 0 or not need or not cap or cap < 1
    or not max_cand or max_cand < 1 or not purge or purge < 0 or #new_id ~= ID_LEN
    or not ((kind == 1 and #fp == 4 + 2 * LANES and nb == 32)
            or (kind == 2 and #fp == 12 and nb == 1)) then
  return redis.error_reply('cluster_assign: bad KEYS/ARGV')
end
local REC, SEEN = KEYS[1], KEYS[2]
local px = string.format('%.0f', math.max(1, math.ceil(window * 1000)))

-- 1. Delete dead clusters, oldest first (a bounded amount of work per call).
if purge > 0 then
  local cutoff = string.format('%.17g', now - window)
  local old = redis.call('ZRANGEBYSCORE', SEEN, '-inf', cutoff, 'WITHSCORES', 'LIMIT', 0, purge)
  local dead = {}
  for i = 1, #old, 2 do
    -- Dead clusters form a prefix (now - s decreases as s grows); near the cutoff the float
    -- comparison decides, so stop at the first one that is still alive.
    if not (now - tonumber(old[i + 1]) > window) then break end
    dead[#dead + 1] = old[i]
  end
  if #dead > 0 then
    redis.call('HDEL', REC, unpack(dead))
    redis.call('ZREM', SEEN, unpack(dead))
  end
end

-- Byte-wise order of ids (Lua's '<' on strings uses the server's locale).
local function id_less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- 2. Alive buckets and the votes of their ids.
local raw = redis.call('MGET', unpack(KEYS, 3))
local buckets = {} -- [j] = {touched = t, ids = {...}} for alive buckets only
local votes, voted = {}, {}
for j = 1, nb do
  local value = raw[j]
  if value then
    local touched = struct.unpack('>d', value)
    if now - touched <= window then
      local ids = {}
      for p = 9, #value - ID_LEN + 1, ID_LEN do
        local id = string.sub(value, p, p + ID_LEN - 1)
        ids[#ids + 1] = id
        if votes[id] then
          votes[id] = votes[id] + 1
        else
          votes[id] = 1
          voted[#voted + 1] = id
        end
      end
      buckets[j] = {touched = touched, ids = ids}
    end
  end
end

-- 3. The alive voted clusters.
local live = {} -- id -> cluster
local candidates = {}
if #voted > 0 then
  local records = redis.call('HMGET', REC, unpack(voted))
  for i = 1, #voted do
    local rec = records[i]
    if rec then
      local created, last_seen = struct.unpack('>dd', rec)
      if now - last_seen <= window then
        local c = {id = voted[i], votes = votes[voted[i]], created = created,
                   last_seen = last_seen, rep = string.sub(rec, 17)}
        live[c.id] = c
        candidates[#candidates + 1] = c
      end
    end
  end
end
table.sort(candidates, function(a, b)
  if a.votes ~= b.votes then return a.votes > b.votes end
  if a.created ~= b.created then return a.created < b.created end
  return id_less(a.id, b.id)
end)

-- 4. Verification against the founders.
local data = string.sub(fp, 5)
local fp_bytes = nil
local function equal_lanes(rep)
  if string.byte(rep, 2) ~= kind then return 0 end
  local other = string.sub(rep, 5)
  if other == data then return LANES end
  if kind ~= 1 or #other ~= #data then return 0 end
  if not fp_bytes then fp_bytes = {string.byte(data, 1, -1)} end
  local b = {string.byte(other, 1, -1)}
  local equal = 0
  for i = 1, 2 * LANES, 2 do
    if b[i] == fp_bytes[i] and b[i + 1] == fp_bytes[i + 1] then equal = equal + 1 end
  end
  return equal
end

-- 5. The best match: most equal lanes, then earliest created, then smallest id.
local best, best_score = nil, -1
for i = 1, math.min(max_cand, #candidates) do
  local c = candidates[i]
  local score = equal_lanes(c.rep)
  if score >= need then
    if best == nil or score > best_score
        or (score == best_score and (c.created < best.created
            or (c.created == best.created and id_less(c.id, best.id)))) then
      best, best_score = c, score
    end
  end
end

if best then
  local w = best.id
  if now > best.last_seen then
    redis.call('HSET', REC, w, struct.pack('>dd', best.created, now) .. best.rep)
    redis.call('ZADD', SEEN, now_s, w)
  end
  for j = 1, nb do
    local bucket = buckets[j]
    if bucket then
      local ids = bucket.ids
      local at = nil
      for k = 1, #ids do
        if ids[k] == w then at = k break end
      end
      if at and (at > 1 or now > bucket.touched) then
        table.remove(ids, at)
        table.insert(ids, 1, w)
        local touched = math.max(bucket.touched, now)
        redis.call('SET', KEYS[2 + j], struct.pack('>d', touched) .. table.concat(ids), 'PX', px)
      end
    end
  end
  redis.call('PEXPIRE', REC, px)
  redis.call('PEXPIRE', SEEN, px)
  return {w, 0}
end

-- 6. Found a cluster.
redis.call('HSET', REC, new_id, struct.pack('>dd', now, now) .. fp)
redis.call('ZADD', SEEN, now_s, new_id)
for j = 1, nb do
  local bucket = buckets[j]
  local kept, touched = {new_id}, now
  if bucket then
    touched = math.max(bucket.touched, now)
    for _, id in ipairs(bucket.ids) do
      if #kept >= cap then break end
      if id ~= new_id and live[id] then kept[#kept + 1] = id end
    end
  end
  redis.call('SET', KEYS[2 + j], struct.pack('>d', touched) .. table.concat(kept), 'PX', px)
end
redis.call('PEXPIRE', REC, px)
redis.call('PEXPIRE', SEEN, px)
return {new_id, 1}
