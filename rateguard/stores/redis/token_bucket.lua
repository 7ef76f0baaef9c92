-- One all-or-nothing token-bucket step over one client's buckets, atomically.
-- Mirrors rateguard.bucket.take_all() and give_back() line for line.
-- KEYS[i]     bucket i: a 32-byte string, struct '<dddd': tokens, last refill, capacity, rate.
--             Packed doubles are exact, and a GET and a SET PX cost Redis less than a hash's
--             HMGET, HSET and PEXPIRE (a third less per call). Every key holds the client's
--             hash tag, so on a Cluster they share one slot
-- ARGV[1]     cost; a negative cost gives -cost tokens back (a later limit refused the request)
-- ARGV[2]     now in seconds: tests only (''), production always uses Redis's own clock, so every
--             app server's decision on a shared bucket is judged by one clock
-- ARGV[3]     the channel a give-back is announced on ('' for none), so that every server's
--             deny cache forgets the refusals these keys made
-- ARGV[2+2i]  rate of bucket i, tokens per second     ARGV[3+2i]  its capacity
-- Returns 4 values per bucket: enough (1/0), whole tokens left, retry_after, reset_after; the
-- two times in whole nanoseconds (an integer reply: formatting a float costs Redis more than the
-- rest of the reply), or as '%.17g' text from 104 days on, where nanoseconds stop being exact.
local cost = tonumber(ARGV[1])
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local EPSILON = 1e-9
local function seconds(x)
  if x < 9e6 then
    return math.floor(x * 1e9)
  end
  return string.format('%.17g', x)
end

local tokens, last, rate, capacity = {}, {}, {}, {}
local allowed = true
for i = 1, #KEYS do
  rate[i] = tonumber(ARGV[2 + 2 * i])
  capacity[i] = tonumber(ARGV[3 + 2 * i])
  local t, ts
  local state = redis.pcall('GET', KEYS[i])
  if type(state) == 'string' then
    t, ts = struct.unpack('<dd', state)
  elseif type(state) == 'table' and state.err then
    -- A hash (t, ts, c, r), as rateguard wrote a bucket before the packed string: read
    -- once; the SET below replaces it.
    state = redis.call('HMGET', KEYS[i], 't', 'ts')
    t, ts = tonumber(state[1]), tonumber(state[2])
  end
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
      -- Once full, a bucket equals a fresh one: let Redis forget it then.
      redis.call('SET', KEYS[i], struct.pack('<dddd', t, last[i], capacity[i], rate[i]), 'PX',
                 math.max(1, math.ceil((capacity[i] - t) / rate[i] * 1000)))
    end
  end
  -- A refused request takes nothing, so the stored state (and its expiry) is still right.
  local retry_after = 0
  if not enough then
    retry_after = (cost - t) / rate[i]
  end
  reply[#reply + 1] = enough and 1 or 0
  reply[#reply + 1] = math.floor(t + EPSILON)
  reply[#reply + 1] = seconds(retry_after)
  reply[#reply + 1] = seconds((capacity[i] - t) / rate[i])
end
if cost < 0 and ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], 'refund\n' .. table.concat(KEYS, '\n'))
end
return reply
