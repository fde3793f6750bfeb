-- quorate fenced write for Redis.
--
--   EVAL <this script> 2 <key> quorate:lease:{<group>} <value> <epoch>
--
-- Sets <key> to <value> only when
--   1. this node is the primary of the group *now*: its agent keeps
--      quorate:lease:{<group>} set to the lease epoch, expiring at the
--      holder's deadline, so the key vanishes when the lease could have run
--      out, even if the agent is frozen;
--   2. <epoch> is exactly that lease epoch (the caller asked quorate who the
--      primary is, and got this epoch with the answer);
--   3. <epoch> is not older than the newest epoch any write on this data set
--      has carried (kept in quorate:lease:{<group>}:fence, which replicates,
--      so a promoted replica remembers it).
--
-- Errors start with QUORATE_NO_LEASE, QUORATE_STALE_EPOCH or
-- QUORATE_BAD_EPOCH; on any of them the client should ask quorate for the
-- current primary and epoch, and retry there.
local lease = redis.call('GET', KEYS[2])
if not lease then
  return redis.error_reply('QUORATE_NO_LEASE this node holds no valid lease for ' .. KEYS[2])
end
local epoch = tonumber(ARGV[2])
if epoch == nil then
  return redis.error_reply('QUORATE_BAD_EPOCH ' .. tostring(ARGV[2]) .. ' is not a number')
end
if epoch ~= tonumber(lease) then
  return redis.error_reply('QUORATE_STALE_EPOCH epoch ' .. ARGV[2] .. ' but this primary holds epoch ' .. lease)
end
local fence = KEYS[2] .. ':fence'
local newest = tonumber(redis.call('GET', fence) or '0')
if epoch < newest then
  return redis.error_reply('QUORATE_STALE_EPOCH epoch ' .. ARGV[2] .. ' is older than ' .. newest)
end
if epoch > newest then
  redis.call('SET', fence, ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1])
