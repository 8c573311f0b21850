'use strict'
// fleet's Node binding beside node:crypto, same process, same 1 KiB body.
//   (cd bindings/node && npm run build) && node benches/bindings/node_bench.js
// Prints ns per call and the speed-up (crypto time / fleet time) for each pair.

const crypto = require('node:crypto')
const fleet = require('../../bindings/node')

const SECRET = 'agent-secret-acme-0123456789'
const HEAD = '{"instance_id":"acme-001","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0,"pad":"'
const BODY = Buffer.from(HEAD + 'x'.repeat(1024 - HEAD.length - 2) + '"}')
if (BODY.length !== 1024) throw new Error('body must be 1 KiB')
const NOW = 1767225600
const V0 = crypto.createHmac('sha256', SECRET).update(BODY).digest('hex')
const V0_HEADERS = { 'x-agent-signature': V0 }
const V1_HEADERS = new fleet.Signer(SECRET).headers('msg_2a7Jd1', BODY, NOW)
const SECRETS = { 'acme-001': SECRET }
const verifier = new fleet.Verifier(SECRETS)
const signer = new fleet.Signer(SECRET)

const peerSignV0 = () => crypto.createHmac('sha256', SECRET).update(BODY).digest('hex')
// The ERP control plane's check with a constant-time comparison: secret by parsed id.
function peerVerifyV0() {
  const key = SECRETS[JSON.parse(BODY).instance_id]
  const expected = crypto.createHmac('sha256', key).update(BODY).digest()
  const given = Buffer.from(V0_HEADERS['x-agent-signature'], 'hex')
  return given.length === expected.length && crypto.timingSafeEqual(given, expected)
}
function peerVerifyV1() {
  const h = V1_HEADERS
  if (Math.abs(NOW - Number(h['webhook-timestamp'])) > 300) return false
  const key = SECRETS[JSON.parse(BODY).instance_id]
  const expected = crypto.createHmac('sha256', key).update(`${h['webhook-id']}.${h['webhook-timestamp']}.`).update(BODY).digest()
  for (const entry of h['webhook-signature'].split(' ')) {
    const [version, encoded] = entry.split(',')
    const given = Buffer.from(encoded || '', 'base64')
    if (version === 'v1' && given.length === expected.length && crypto.timingSafeEqual(given, expected)) return true
  }
  return false
}

function bestNs(fn, iterations = 50000, rounds = 7) {
  let best = Infinity
  for (let r = 0; r < rounds; r++) {
    const start = process.hrtime.bigint()
    for (let i = 0; i < iterations; i++) fn()
    best = Math.min(best, Number(process.hrtime.bigint() - start) / iterations)
  }
  return best
}

if (!peerVerifyV0() || !peerVerifyV1() || fleet.signV0(SECRET, BODY) !== peerSignV0()) throw new Error('peers disagree')
const pairs = [
  ['signV0', () => fleet.signV0(SECRET, BODY), peerSignV0],
  ['Signer.signV0', () => signer.signV0(BODY), peerSignV0],
  ['Verifier.verify v0', () => verifier.verify(BODY, V0_HEADERS, NOW), peerVerifyV0],
  ['Verifier.verify v1', () => verifier.verify(BODY, V1_HEADERS, NOW), peerVerifyV1],
]
console.log(`${'operation'.padEnd(22)} ${'fleet'.padStart(10)} ${'node:crypto'.padStart(12)} ${'speed-up'.padStart(9)}`)
for (const [name, ours, peer] of pairs) {
  const a = bestNs(ours)
  const b = bestNs(peer)
  console.log(`${name.padEnd(22)} ${a.toFixed(0).padStart(7)} ns ${b.toFixed(0).padStart(9)} ns ${(b / a).toFixed(2).padStart(8)}x`)
}
