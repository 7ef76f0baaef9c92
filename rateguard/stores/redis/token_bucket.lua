-- One token-bucket step, atomically. Mirrors rateguard.bucket.take() line for line.
-- KEYS[1]  the bucket (a hash: t = tokens, ts = last refill, c = capacity, r = rate)
-- ARGV[1]  rate, tokens per second     ARGV[2]  capacity     ARGV[3]  cost
-- ARGV[4]  now in seconds: tests only; production always uses Redis's own clock, so every
--          app server's decision on a shared bucket is judged by one clock.
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now
if ARGV[4] then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local EPSILON = 1e-9

local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = capacity
  last = now
elseif now > last then
  tokens = math.min(capacity, tokens + (now - last) * rate)
  last = now
end

local allowed = 0
local retry_after = 0
if tokens + EPSILON >= cost then
  tokens = math.max(0, tokens - cost)
  allowed = 1
else
  retry_after = (cost - tokens) / rate
end
local reset_after = (capacity - tokens) / rate

-- A denied request takes nothing, so the stored state (and its expiry) is still right.
if allowed == 1 then
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'ts', string.format('%.17g', last),
             'c', ARGV[2], 'r', ARGV[1])
  -- Once full, a bucket equals a fresh one: let Redis forget it then.
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(reset_after * 1000)))
end
return {allowed, math.floor(tokens + EPSILON), string.format('%.17g', retry_after),
        string.format('%.17g', reset_after)}
