-- campaign_decide.lua: one message's whole store decision in one atomic call: assign its campaign
-- (cluster_assign.lua) and decide and reserve it in that campaign's counters
-- (campaign_reserve.lua).  Run as the last part of a script that first defines the functions
-- cluster_assign(KEYS, ARGV) and campaign_reserve(KEYS, ARGV) from those two files unchanged
-- (counting.decide_script() builds it), so both keep their own contracts and tests.
--
-- KEYS     cluster_assign's KEYS: the customer's cluster records, seen set, band buckets.
-- ARGV[1..8]  cluster_assign's ARGV.
-- ARGV[9]  the customer's campaign key prefix, ending in ':' (counting.CampaignKeys: prefix ..
--          campaign id .. ':' .. part); the campaign keys are built here from the assigned id,
--          a 16-digit hex id that key escaping leaves alone, so they are the keys
--          campaign_settle.lua is later called with.  They carry the same hash tag as KEYS (the
--          customer's), so they are in the same Redis Cluster slot.
-- ARGV[10..] campaign_reserve's ARGV (now, reservation id, params, monitored rules, recipient
--          hashes and flags).
-- Returns: {campaign id, 1 if founded by this call else 0, campaign_reserve's result array}.

local assigned = cluster_assign(KEYS, {unpack(ARGV, 1, 8)})
if assigned.err then return assigned end
local campaign = assigned[1]
local base = ARGV[9] .. campaign .. ':'
local rargv = {unpack(ARGV, 10)}
local rkeys = {base .. 'sent', base .. 'held', base .. 'pend', base .. 'resv', base .. 'resx',
               base .. 'bulk_until'}
for i = 1, (#rargv - 8) / 2 do rkeys[6 + i] = base .. 'mb:' .. rargv[7 + 2 * i] end
local reserved = campaign_reserve(rkeys, rargv)
if reserved.err then return reserved end
return {campaign, assigned[2], reserved}
