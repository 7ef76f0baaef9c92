-- One all-or-nothing token-bucket step over one client's buckets, atomically.
-- Mirrors rateguard.bucket.take_all() and give_back() line for line.
-- KEYS[i]     bucket i (a hash: t = tokens, ts = last refill, c = capacity, r = rate); every key
--             holds the client's hash tag, so on a Cluster they share one slot
-- ARGV[1]     cost; a negative cost gives -cost tokens back (a later limit refused the request)
-- ARGV[2]     now in seconds: tests only (''), production always uses Redis's own clock, so every
--             app server's decision on a shared bucket is judged by one clock
-- ARGV[3]     the channel a give-back is announced on ('' for none), so that every server's
--             deny cache forgets the refusals these keys made
-- ARGV[2+2i]  rate of bucket i, tokens per second     ARGV[3+2i]  its capacity
-- Returns 4 values per bucket: enough (1/0), whole tokens left, retry_after, reset_after.
local cost = tonumber(ARGV[1])
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local EPSILON = 1e-9

local tokens, last, rate, capacity = {}, {}, {}, {}
local allowed = true
for i = 1, #KEYS do
  rate[i] = tonumber(ARGV[2 + 2 * i])
  capacity[i] = tonumber(ARGV[3 + 2 * i])
  local state = redis.call('HMGET', KEYS[i], 't', 'ts')
  local t = tonumber(state[1])
  local ts = tonumber(state[2])
  if t == nil or ts == nil then
    t = capacity[i]
    ts = now
  elseif now > ts then
    t = math.min(capacity[i], t + (now - ts) * rate[i])
    ts = now
  end
  if t + EPSILON < cost then
    allowed = false
  end
  tokens[i] = t
  last[i] = ts
end

local reply = {}
for i = 1, #KEYS do
  local t = tokens[i]
  local enough = t + EPSILON >= cost
  if allowed then
    t = math.min(capacity[i], math.max(0, t - cost))
    if t >= capacity[i] then
      -- Full: the same as a fresh bucket. Let Redis forget it.
      redis.call('DEL', KEYS[i])
    else
      redis.call('HSET', KEYS[i], 't', string.format('%.17g', t), 'ts', string.format('%.17g', last[i]),
                 'c', ARGV[3 + 2 * i], 'r', ARGV[2 + 2 * i])
      -- Once full, a bucket equals a fresh one: let Redis forget it then.
      redis.call('PEXPIRE', KEYS[i], math.max(1, math.ceil((capacity[i] - t) / rate[i] * 1000)))
    end
  end
  -- A refused request takes nothing, so the stored state (and its expiry) is still right.
  local retry_after = 0
  if not enough then
    retry_after = (cost - t) / rate[i]
  end
  reply[#reply + 1] = enough and 1 or 0
  reply[#reply + 1] = math.floor(t + EPSILON)
  reply[#reply + 1] = string.format('%.17g', retry_after)
  reply[#reply + 1] = string.format('%.17g', (capacity[i] - t) / rate[i])
end
if cost < 0 and ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], 'refund\n' .. table.concat(KEYS, '\n'))
end
return reply
