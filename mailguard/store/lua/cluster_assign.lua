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
--          PEXPIRE window (rounded up to whole ms) on every call.  A "bk" encoded as a listpack
--          (few clusters) is first made a hash table: field ':' (never a band field, which has
--          9 bytes) is set to 256 bytes and deleted again, so its contents are unchanged.
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
-- Formats: the 32 bands' 8 bytes of a sketch; a whole record of each kind (created, last_seen,
-- rep, band times); buckets of k ids (built as needed).  One struct call per value parsed.
local BANDS_FMT = string.rep('c8', 32)
local REC_FMT = {[1] = '>ddc' .. (4 + 2 * LANES) .. string.rep('d', 32), [2] = '>ddc12d'}
local REC_LEN = {[1] = 16 + 4 + 2 * LANES + 8 * 32, [2] = 16 + 12 + 8}
local BAND_BYTE = {'\0', '\1', '\2', '\3', '\4', '\5', '\6', '\7', '\8', '\9', '\10', '\11', '\12',
  '\13', '\14', '\15', '\16', '\17', '\18', '\19', '\20', '\21', '\22', '\23', '\24', '\25', '\26',
  '\27', '\28', '\29', '\30', '\31'}

-- The bucket fields of a fingerprint's bands (to_bytes() form).
local function fields_of(f)
  if string.byte(f, 2) == 2 then return {'x' .. string.sub(f, 5, 12)} end
  local out = {struct.unpack(BANDS_FMT, f, 5)}
  for j = 1, 32 do out[j] = BAND_BYTE[j] .. out[j] end
  out[33] = nil -- struct.unpack's next position
  return out
end

-- A record: array {created, last_seen, rep, band time 1, ...} with one band time per band of rep
-- (32 or 1; NEVER where the stored value has none).
local function parse(value)
  local kind = string.byte(value, 18)
  local nbands = kind == 1 and 32 or 1
  if #value == REC_LEN[kind] then
    local c = {struct.unpack(REC_FMT[kind], value)}
    c[4 + nbands] = nil -- struct.unpack's next position
    return c
  end
  local rep_len = kind == 1 and 4 + 2 * LANES or 12
  local created, last_seen = struct.unpack('>dd', value)
  local c = {created, last_seen, string.sub(value, 17, 16 + rep_len)}
  for j = 1, nbands do
    local at = 17 + rep_len + 8 * (j - 1)
    c[3 + j] = #value >= at + 7 and struct.unpack('>d', value, at) or NEVER
  end
  return c
end

local function pack_record(c)
  return struct.pack(REC_FMT[string.byte(c[3], 2) == 1 and 1 or 2], unpack(c))
end

-- 0. A small hash is stored as a listpack, where each field of an HMGET is found by a linear
-- scan (32 fields of up to 512 entries: up to ~1M instructions per call, against ~60k in a hash
-- table).  So "bk" is converted once to a hash table (it stays one until the server reloads it)
-- by writing and deleting a field longer than any real one (data unchanged).
local encoding = redis.call('OBJECT', 'ENCODING', BUCKETS)
if encoding == 'listpack' or encoding == 'ziplist' then
  redis.call('HSET', BUCKETS, ':', string.rep('-', 256))
  redis.call('HDEL', BUCKETS, ':')
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
        for j, field in ipairs(fields_of(c[3])) do
          if not drop[field] then
            drop[field], folded[field] = {}, NEVER
            fields[#fields + 1] = field
          end
          drop[field][dead[i]] = true
          folded[field] = math.max(folded[field], c[3 + j])
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

-- 2. The buckets, the records of their ids, which buckets are alive, and the votes.  Buckets
-- with equal stored values (a campaign's copies share most bands) are parsed and counted once.
local fields = fields_of(fp)
local nb = #fields
local raw = redis.call('HMGET', BUCKETS, unpack(fields))
local values, bands_of = {}, {} -- distinct bucket values in order; value -> its bands {j, ...}
for j = 1, nb do
  local value = raw[j]
  if value then
    local bands = bands_of[value]
    if bands then
      bands[#bands + 1] = j
    else
      bands_of[value] = {j}
      values[#values + 1] = value
    end
  end
end
local parsed = {} -- value -> {stored time, id, id, ...}
local all, listed = {}, {}
for g = 1, #values do
  local value = values[g]
  local k = math.floor((#value - 8) / ID_LEN)
  local bucket = {struct.unpack('>d' .. string.rep('c' .. ID_LEN, k), value)}
  bucket[k + 2] = nil -- struct.unpack's next position
  for i = 2, k + 1 do
    local id = bucket[i]
    if not listed[id] then
      listed[id] = true
      all[#all + 1] = id
    end
  end
  parsed[value] = bucket
end
local records = {} -- id -> parsed record
if #all > 0 then
  local rvalues = redis.call('HMGET', REC, unpack(all))
  for i = 1, #all do
    if rvalues[i] then records[all[i]] = parse(rvalues[i]) end
  end
end
-- The model's touched of bucket j (holding bucket): its stored time or a later band time.
local function touched_at(bucket, j)
  local touched = bucket[1]
  for i = 2, #bucket do
    local c = records[bucket[i]]
    local t = c and c[3 + j]
    if t and t > touched then touched = t end
  end
  return touched
end
-- Alive iff now - touched <= window; touched is the largest of the times, so (the subtraction
-- being monotonic) a bucket whose stored time is alive is alive whatever its band times.
local alive_of = {} -- value -> its alive bands {j, ...}
local votes, voted = {}, {}
for g = 1, #values do
  local value = values[g]
  local bucket = parsed[value]
  local alive = bands_of[value]
  if not (now - bucket[1] <= window) then
    local bands = alive
    alive = {}
    for b = 1, #bands do
      local j = bands[b]
      if now - touched_at(bucket, j) <= window then alive[#alive + 1] = j end
    end
  end
  local n = #alive
  if n > 0 then
    alive_of[value] = alive
    for i = 2, #bucket do
      local id = bucket[i]
      local v = votes[id]
      if v then
        votes[id] = v + n
      else
        votes[id] = n
        voted[#voted + 1] = id
      end
    end
  end
end

-- 3. The alive voted clusters.
local live = {} -- id -> record
local candidates = {} -- {record, id, votes}
for i = 1, #voted do
  local id = voted[i]
  local c = records[id]
  if c and now - c[2] <= window then
    live[id] = c
    candidates[#candidates + 1] = {c, id, votes[id]}
  end
end
if #candidates > 1 then
  table.sort(candidates, function(a, b)
    if a[3] ~= b[3] then return a[3] > b[3] end
    if a[1][1] ~= b[1][1] then return a[1][1] < b[1][1] end
    return id_less(a[2], b[2])
  end)
end

-- 4. Verification against the founders.
local data = string.sub(fp, 5)
local fp_bytes = nil
local function equal_lanes(rep)
  if rep == fp then return LANES end
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
local best, best_id, best_score = nil, nil, -1
for i = 1, math.min(max_cand, #candidates) do
  local c, id = candidates[i][1], candidates[i][2]
  local score = equal_lanes(c[3])
  if score >= need then
    if best == nil or score > best_score
        or (score == best_score and (c[1] < best[1]
            or (c[1] == best[1] and id_less(id, best_id)))) then
      best, best_id, best_score = c, id, score
    end
  end
end

if best then
  local w = best_id
  local changed = now > best[2]
  local set = {}
  for g = 1, #values do
    local value = values[g]
    local alive = alive_of[value]
    if alive then
      local bucket = parsed[value]
      local at = nil
      for k = 2, #bucket do
        if bucket[k] == w then at = k break end
      end
      if at then
        local ids = nil
        if at > 2 then
          ids = {w}
          for k = 2, #bucket do
            if k ~= at then ids[#ids + 1] = bucket[k] end
          end
          ids = table.concat(ids)
        end
        for b = 1, #alive do
          local j = alive[b]
          if ids then -- the winner moves to the front (touched from the times before this call)
            set[#set + 1] = fields[j]
            set[#set + 1] = struct.pack('>d', math.max(touched_at(bucket, j), now)) .. ids
          end
          if not (best[3 + j] >= now) then -- NEVER for a record without band times
            best[3 + j] = now
            changed = true
          end
        end
      end
    end
  end
  if #set > 0 then redis.call('HSET', BUCKETS, unpack(set)) end
  if changed then
    if now > best[2] then
      best[2] = now
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
local founded = {now, now, fp}
for j = 1, nb do founded[3 + j] = now end
redis.call('HSET', REC, new_id, pack_record(founded))
redis.call('ZADD', SEEN, now_s, new_id)
local set = {}
local fresh = nil -- the value of a bucket that was empty or dead: touched now, the new id alone
for j = 1, nb do
  local value = raw[j]
  local written = nil
  if value then
    local bucket = parsed[value]
    local t = touched_at(bucket, j)
    if now - t <= window then -- alive
      local kept = {new_id}
      for k = 2, #bucket do
        if #kept >= cap then break end
        local id = bucket[k]
        if id ~= new_id and live[id] then kept[#kept + 1] = id end
      end
      written = struct.pack('>d', math.max(t, now)) .. table.concat(kept)
    end
  end
  if not written then
    if not fresh then fresh = struct.pack('>d', now) .. new_id end
    written = fresh
  end
  set[#set + 1] = fields[j]
  set[#set + 1] = written
end
redis.call('HSET', BUCKETS, unpack(set))
redis.call('PEXPIRE', REC, px)
redis.call('PEXPIRE', SEEN, px)
redis.call('PEXPIRE', BUCKETS, px)
return {new_id, 1}
