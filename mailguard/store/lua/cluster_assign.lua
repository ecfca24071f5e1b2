-- cluster_assign.lua: assign one message (its fingerprint) of a customer to a cluster ("campaign"):
-- the id of an earlier similar message within the window, or a newly founded one.  Implements
-- exactly the algorithm of mailguard/core/fingerprint/cluster.py (ClusterIndex.assign, whose
-- module docstring is normative), atomically, so concurrent gates never split a new campaign.
--
-- KEYS[1]  hash "rec": cluster id -> record = struct '>dd' (created, last_seen) .. rep .. band
--          times, where rep is the founding fingerprint's Fingerprint.to_bytes() (260 or 12
--          bytes) and the band times are one '>d' per band of rep (32 or 1): the latest time a
--          message was assigned to the cluster (founding included) through that band's bucket.
-- KEYS[2]  sorted set "seen": cluster id -> last_seen (the same double as in the record); used
--          only to find dead clusters to delete.
-- KEYS[3]  hash "bk": the band buckets.  Field: the band's index byte and the band's 8 bytes of
--          the fingerprint (string.char(i) .. bytes 5+8i..12+8i of to_bytes(), i = 0..31), or
--          'x' and the 8-byte digest of an exact fingerprint; so a band key of
--          sketch.band_keys() in binary.  Value: struct '>d' (stored) .. the bucket's cluster
--          ids concatenated (16 characters each), most recently used first.
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
-- A bucket's touched (the model's) is not stored as such: it is the largest of its stored time
-- and the band times of its ids' records for its band.  So a match, which moves touched to now
-- in every alive bucket holding the winner, writes the winner's record (its band times) and no
-- bucket, unless the winner has to move to the front of one.  This equals the model's touched:
-- an id enters a bucket only when its cluster is founded (with the founder's band key, so each
-- band time of a record belongs to exactly one bucket); a band time grows only while its id is
-- in that bucket and the bucket is alive, exactly when the model's touched becomes max(touched,
-- now); and whenever a bucket is rewritten without some id, or a record is replaced or deleted,
-- the times it loses are folded into the stored time first (deleting a dead cluster's record
-- loses nothing at a later now: its band times are at most its last_seen).
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
--          "seen" and from their buckets (never a live one: each is checked with the exact rule);
--          a bucket left empty is deleted.  On a match: the winner's record (and score if
--          last_seen grows) if a time of it grows; each bucket whose order changes.  On founding:
--          the record, its score, every bucket of the fingerprint.  "rec", "seen" and "bk" get
--          PEXPIRE window (rounded up to whole ms) on every call.
-- Returns: array {cluster id, 1 if founded by this call else 0}.

local now_s, window_s, fp = ARGV[1], ARGV[2], ARGV[3]
local now, window = tonumber(now_s), tonumber(window_s)
local need, new_id = tonumber(ARGV[4]), ARGV[5]
local cap, max_cand, purge = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ID_LEN, LANES = 16, 128
local kind = fp and string.byte(fp, 2)
if #ARGV ~= 8 or #KEYS ~= 3 or not now or not window or window <= 0 or not need or not cap
    or cap < 1 or not max_cand or max_cand < 1 or not purge or purge < 0 or #new_id ~= ID_LEN
    or not ((kind == 1 and #fp == 4 + 2 * LANES) or (kind == 2 and #fp == 12)) then
  return redis.error_reply('cluster_assign: bad KEYS/ARGV')
end
local REC, SEEN, BUCKETS = KEYS[1], KEYS[2], KEYS[3]
local px = string.format('%.0f', math.max(1, math.ceil(window * 1000)))
local NEVER = -math.huge

-- The bucket fields of a fingerprint's bands (to_bytes() form).
local function fields_of(f)
  if string.byte(f, 2) == 2 then return {'x' .. string.sub(f, 5, 12)} end
  local out = {}
  for j = 0, 31 do out[j + 1] = string.char(j) .. string.sub(f, 5 + 8 * j, 12 + 8 * j) end
  return out
end

-- A record: {created, last_seen, rep, times = band times (NEVER where missing)}.
local function parse(value)
  local created, last_seen = struct.unpack('>dd', value)
  local rep_len = string.byte(value, 18) == 1 and 4 + 2 * LANES or 12
  local times = {}
  for j = 1, rep_len == 12 and 1 or 32 do
    local at = 17 + rep_len + 8 * (j - 1)
    times[j] = #value >= at + 7 and struct.unpack('>d', value, at) or NEVER
  end
  return {created = created, last_seen = last_seen, rep = string.sub(value, 17, 16 + rep_len),
          times = times}
end

local function pack_record(c)
  local parts = {struct.pack('>dd', c.created, c.last_seen), c.rep}
  for j = 1, #c.times do parts[j + 2] = struct.pack('>d', c.times[j]) end
  return table.concat(parts)
end

-- 1. Delete dead clusters, oldest first (a bounded amount of work per call), and their entries.
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
    local values = redis.call('HMGET', REC, unpack(dead))
    local drop, fields, folded = {}, {}, {} -- field -> {id -> true}; fields in order; max time
    for i = 1, #dead do
      if values[i] then
        local c = parse(values[i])
        for j, field in ipairs(fields_of(c.rep)) do
          if not drop[field] then
            drop[field], folded[field] = {}, NEVER
            fields[#fields + 1] = field
          end
          drop[field][dead[i]] = true
          folded[field] = math.max(folded[field], c.times[j])
        end
      end
    end
    if #fields > 0 then
      local buckets = redis.call('HMGET', BUCKETS, unpack(fields))
      local gone, set = {}, {}
      for i, field in ipairs(fields) do
        local value = buckets[i]
        if value then
          local kept = {}
          for p = 9, #value - ID_LEN + 1, ID_LEN do
            local id = string.sub(value, p, p + ID_LEN - 1)
            if not drop[field][id] then kept[#kept + 1] = id end
          end
          if #kept == 0 then
            gone[#gone + 1] = field
          elseif #kept * ID_LEN + 8 < #value then
            local stored = math.max(struct.unpack('>d', value), folded[field])
            set[#set + 1] = field
            set[#set + 1] = struct.pack('>d', stored) .. table.concat(kept)
          end
        end
      end
      if #gone > 0 then redis.call('HDEL', BUCKETS, unpack(gone)) end
      if #set > 0 then redis.call('HSET', BUCKETS, unpack(set)) end
    end
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

-- 2. The buckets, the records of their ids, which buckets are alive, and the votes.
local fields = fields_of(fp)
local nb = #fields
local raw = redis.call('HMGET', BUCKETS, unpack(fields))
local parsed = {} -- [j] = {touched = stored time, ids = {...}}
local all, listed = {}, {}
for j = 1, nb do
  local value = raw[j]
  if value then
    local ids = {}
    for p = 9, #value - ID_LEN + 1, ID_LEN do
      local id = string.sub(value, p, p + ID_LEN - 1)
      ids[#ids + 1] = id
      if not listed[id] then
        listed[id] = true
        all[#all + 1] = id
      end
    end
    parsed[j] = {touched = struct.unpack('>d', value), ids = ids}
  end
end
local records = {} -- id -> parsed record
if #all > 0 then
  local values = redis.call('HMGET', REC, unpack(all))
  for i = 1, #all do
    if values[i] then records[all[i]] = parse(values[i]) end
  end
end
local buckets = {} -- [j] = {touched = the model's touched, ids = {...}} for alive buckets only
local votes, voted = {}, {}
for j = 1, nb do
  local bucket = parsed[j]
  if bucket then
    local touched = bucket.touched
    for _, id in ipairs(bucket.ids) do
      local c = records[id]
      if c and c.times[j] and c.times[j] > touched then touched = c.times[j] end
    end
    if now - touched <= window then
      bucket.touched = touched
      buckets[j] = bucket
      for _, id in ipairs(bucket.ids) do
        if votes[id] then
          votes[id] = votes[id] + 1
        else
          votes[id] = 1
          voted[#voted + 1] = id
        end
      end
    end
  end
end

-- 3. The alive voted clusters.
local live = {} -- id -> cluster
local candidates = {}
for i = 1, #voted do
  local id = voted[i]
  local c = records[id]
  if c and now - c.last_seen <= window then
    c.id, c.votes = id, votes[id]
    live[id] = c
    candidates[#candidates + 1] = c
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
  local changed = now > best.last_seen
  local set = {}
  for j = 1, nb do
    local bucket = buckets[j]
    if bucket then
      local ids = bucket.ids
      local at = nil
      for k = 1, #ids do
        if ids[k] == w then at = k break end
      end
      if at then
        if not (best.times[j] >= now) then -- NEVER for a record without band times
          best.times[j] = now
          changed = true
        end
        if at > 1 then
          table.remove(ids, at)
          table.insert(ids, 1, w)
          set[#set + 1] = fields[j]
          set[#set + 1] = struct.pack('>d', math.max(bucket.touched, now)) .. table.concat(ids)
        end
      end
    end
  end
  if #set > 0 then redis.call('HSET', BUCKETS, unpack(set)) end
  if changed then
    if now > best.last_seen then
      best.last_seen = now
      redis.call('ZADD', SEEN, now_s, w)
    end
    redis.call('HSET', REC, w, pack_record(best))
  end
  redis.call('PEXPIRE', REC, px)
  redis.call('PEXPIRE', SEEN, px)
  redis.call('PEXPIRE', BUCKETS, px)
  return {w, 0}
end

-- 6. Found a cluster.
local times = {}
for j = 1, nb do times[j] = now end
redis.call('HSET', REC, new_id, pack_record({created = now, last_seen = now, rep = fp,
                                              times = times}))
redis.call('ZADD', SEEN, now_s, new_id)
local set = {}
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
  set[#set + 1] = fields[j]
  set[#set + 1] = struct.pack('>d', touched) .. table.concat(kept)
end
redis.call('HSET', BUCKETS, unpack(set))
redis.call('PEXPIRE', REC, px)
redis.call('PEXPIRE', SEEN, px)
redis.call('PEXPIRE', BUCKETS, px)
return {new_id, 1}
