'use strict'
const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const http = require('node:http')
const path = require('node:path')
const { Webhook } = require('standardwebhooks')
const fleet = require('..')
const { createServer } = require('../examples/heartbeat-server.js')

const VECTORS = path.join(__dirname, '..', '..', '..', 'tests', 'vectors')
const load = (name) => JSON.parse(fs.readFileSync(path.join(VECTORS, name), 'utf8'))
const SIGNING = load('signing.json')
const HEARTBEATS = load('heartbeats.json')
const MANIFESTS = load('manifests.json')

function headersOf(c) {
  if (c.scheme === 'v0') return { 'X-Agent-Signature': c.signature }
  const h = { 'Webhook-Signature': c.signature }
  if (c.msg_id !== null) h['Webhook-Id'] = c.msg_id
  if (c.timestamp !== null) h['Webhook-Timestamp'] = String(c.timestamp)
  return h
}

test('signing vectors through Signer', () => {
  for (const c of SIGNING) {
    const signer = new fleet.Signer(c.secret)
    if (c.scheme === 'v0') {
      assert.equal(fleet.signV0(c.secret, c.body) === c.signature.toLowerCase(), c.valid, c.name)
      assert.equal(signer.signV0(Buffer.from(c.body)), fleet.signV0(c.secret, c.body), c.name)
    } else if (c.valid) {
      signer.verify(c.body, headersOf(c), c.now)
    } else {
      assert.throws(() => signer.verify(c.body, headersOf(c), c.now), (e) => e instanceof fleet.InvalidSignature && e.kind === c.error, c.name)
    }
  }
})

test('signing vectors through Verifier, sync and async', async () => {
  const addressed = SIGNING.filter((c) => 'instance_id' in JSON.parse(c.body))
  assert.ok(addressed.length >= SIGNING.length - 2)
  for (const c of addressed) {
    const id = JSON.parse(c.body).instance_id
    const verifier = new fleet.Verifier({ [id]: c.secret })
    if (c.valid) {
      assert.equal(verifier.verify(Buffer.from(c.body), headersOf(c), c.now), id, c.name)
      assert.equal(await verifier.verifyAsync(c.body, headersOf(c), c.now), id, c.name)
    } else {
      assert.throws(() => verifier.verify(c.body, headersOf(c), c.now), (e) => e instanceof fleet.InvalidSignature && e.kind === c.error, c.name)
      await assert.rejects(verifier.verifyAsync(c.body, headersOf(c), c.now), (e) => e.kind === c.error, c.name)
    }
  }
})

test('heartbeat vectors report the expected paths', () => {
  for (const c of HEARTBEATS) {
    if (c.valid) {
      assert.equal(fleet.validateHeartbeat(c.body).instance_id, JSON.parse(c.body).instance_id, c.name)
    } else {
      assert.throws(() => fleet.validateHeartbeat(Buffer.from(c.body)), (e) => e instanceof fleet.ValidationError && JSON.stringify(e.paths) === JSON.stringify(c.error_paths), c.name)
    }
  }
})

test('manifest vectors', () => {
  for (const c of MANIFESTS) {
    if (c.valid) {
      assert.equal(fleet.verifyManifest(c.manifest, c.public_keys, c.hmac_secret).version, c.manifest.version, c.name)
    } else {
      assert.throws(() => fleet.verifyManifest(c.manifest, c.public_keys, c.hmac_secret), (e) => e instanceof fleet.ManifestError && e.kind === c.error, c.name)
    }
  }
})

test('our v1 signature verifies with the standardwebhooks package', () => {
  const secret = 'agent-secret-acme'
  const body = '{"instance_id":"acme-001","db_ok":true}'
  const headers = new fleet.Signer(secret).headers('msg_n1', body)
  const wh = new Webhook(Buffer.from(secret).toString('base64'))
  assert.equal(wh.verify(body, headers).instance_id, 'acme-001')
  assert.throws(() => new Webhook(Buffer.from('other').toString('base64')).verify(body, headers))
})

test('a standardwebhooks signature verifies with us', () => {
  const secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'
  const body = '{"instance_id":"edge-9","db_ok":true}'
  const now = new Date()
  const signature = new Webhook(secret).sign('msg_sw', now, body)
  const headers = { 'webhook-id': 'msg_sw', 'webhook-timestamp': String(Math.floor(now.getTime() / 1000)), 'webhook-signature': signature }
  assert.equal(new fleet.Verifier({ 'edge-9': secret }).verify(body, headers), 'edge-9')
  assert.throws(() => new fleet.Verifier({ 'edge-9': secret }).verify(body.replace('true', 'false'), headers), fleet.InvalidSignature)
})

test('configuration errors are typed and never echo the secret', () => {
  assert.throws(() => new fleet.Verifier({ a: '', b: 'visible-secret-value' }), (e) => e instanceof fleet.ConfigError && !e.message.includes('visible-secret-value'))
  assert.throws(() => new fleet.Signer(''), fleet.ConfigError)
  assert.equal(String(new fleet.Signer('hunter2')), 'Signer([redacted])')
})

async function post(port, body, headers) {
  const res = await fetch(`http://127.0.0.1:${port}/api/heartbeats`, { method: 'POST', body, headers: { 'content-type': 'application/json', ...headers } })
  return { status: res.status, json: await res.json().catch(() => null) }
}

test('the example server verifies heartbeats with the middleware', async () => {
  const received = []
  const server = createServer({ secrets: { 'acme-001': 's3cret' }, onHeartbeat: (id, hb) => received.push([id, hb]) })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = server.address().port
  try {
    const signer = new fleet.Signer('s3cret')
    const body = '{"instance_id":"acme-001","db_ok":true,"redis_ok":false,"storage_ok":true,"jobs_failed":0}'
    const ok = await post(port, body, signer.headers('msg_ok', body))
    assert.equal(ok.status, 200)
    const v0 = await post(port, body, { 'x-agent-signature': fleet.signV0('s3cret', body) })
    assert.equal(v0.status, 200)
    assert.deepEqual(received.map(([id, hb]) => [id, hb.redis_ok]), [['acme-001', false], ['acme-001', false]])

    const tampered = await post(port, body.replace('"redis_ok":false', '"redis_ok":true'), signer.headers('msg_t', body))
    assert.equal(tampered.status, 401)
    assert.equal(tampered.json.error.code, 'unauthorized')
    const wrongLength = await post(port, body, { 'x-agent-signature': 'abc' })
    assert.equal(wrongLength.status, 401)
    const invalid = '{"instance_id":"acme-001","db_ok":"yes"}'
    const bad = await post(port, invalid, signer.headers('msg_bad', invalid))
    assert.equal(bad.status, 422)
    assert.deepEqual(bad.json.error.fields.map((f) => f.path), ['db_ok', 'redis_ok', 'storage_ok', 'jobs_failed'])
    const huge = '{"instance_id":"acme-001","pad":"' + 'x'.repeat(1024 * 1024) + '"}'
    assert.equal((await post(port, huge, signer.headers('msg_big', huge))).status, 413)
    assert.equal(received.length, 2, 'refused requests must not reach the handler')
  } finally {
    server.close()
  }
})

test('headers as a Fetch Headers, a Map, pairs or rawHeaders verify like an object', async () => {
  const body = '{"instance_id":"acme-001","db_ok":true}'
  const headers = new fleet.Signer('s3cret').headers('msg_forms', body)
  const verifier = new fleet.Verifier({ 'acme-001': 's3cret' })
  const forms = [new Headers(headers), new Map(Object.entries(headers)), Object.entries(headers), Object.entries(headers).flat()]
  for (const form of forms) {
    assert.equal(verifier.verify(body, form), 'acme-001')
    assert.equal(await verifier.verifyAsync(body, form), 'acme-001')
  }
  assert.throws(() => verifier.verify(body, 'webhook-id: msg_forms'), TypeError)
})

test('arguments of the wrong type are TypeErrors that name the argument', () => {
  const body = '{"instance_id":"acme-001","db_ok":true}'
  const headers = new fleet.Signer('s3cret').headers('msg_args', body)
  const verifier = new fleet.Verifier({ 'acme-001': 's3cret' })
  const named = (name) => (e) => e instanceof TypeError && e.code === 'ERR_INVALID_ARG_TYPE' && e.message.startsWith(`${name} must be`)
  assert.throws(() => verifier.verify(JSON.parse(body), headers), (e) => named('body')(e) && /parsed object/.test(e.message))
  assert.throws(() => fleet.validateHeartbeat(JSON.parse(body)), named('body'))
  assert.throws(() => new fleet.Signer(1234), named('secret'))
  assert.throws(() => fleet.signV0(undefined, body), named('secret'))
  assert.throws(() => new fleet.Signer('s3cret').headers(7, body), named('msgId'))
  assert.throws(() => fleet.verifyManifest(MANIFESTS[0].manifest), named('publicKeys'))
  assert.throws(() => new fleet.Verifier({ 'acme-001': 's3cret' }, 42), named('fallback'))
  assert.throws(() => verifier.verify(body, headers, new Date()), named('now'))
  // Date.now() is milliseconds: say so instead of refusing the timestamp as out of tolerance.
  assert.throws(() => verifier.verify(body, headers, Date.now()), (e) => e instanceof RangeError && /milliseconds/.test(e.message))
  assert.throws(() => new fleet.Signer('s3cret').headers('msg_ms', body, Date.now()), RangeError)
})

test('a verifier without any secret is a ConfigError, not a 401 per request', () => {
  const unset = (e) => e instanceof fleet.ConfigError && /CONTROL_PLANE_AGENT_SECRETS/.test(e.message)
  assert.throws(() => new fleet.Verifier(), unset)
  assert.throws(() => new fleet.Verifier(undefined, ''), unset)
  assert.throws(() => new fleet.Verifier({}), unset)
  assert.throws(() => fleetMiddlewareFromEnv({}), unset)
  assert.equal(new fleet.Verifier(null, 'shared-token').verify('{"instance_id":"x"}', { 'x-agent-signature': fleet.signV0('shared-token', '{"instance_id":"x"}') }), 'x')
})

// The README's snippet, with the variables unset.
function fleetMiddlewareFromEnv(env) {
  return fleet.fleetMiddleware({ secrets: env.CONTROL_PLANE_AGENT_SECRETS, fallback: env.CONTROL_PLANE_AGENT_TOKEN, heartbeat: true })
}

// A server whose handler runs `before` (e.g. a body parser) and then the middleware, and
// records each call of `next`: the error passed, and req.fleet.
async function withMiddleware(options, before, fn) {
  const passed = []
  const verify = fleet.fleetMiddleware(options)
  const server = http.createServer((req, res) => {
    before(req, () =>
      verify(req, res, (err) => {
        passed.push({ err, fleet: req.fleet })
        res.statusCode = err ? 500 : 200
        res.end()
      }),
    )
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  try {
    await fn(server.address().port, passed)
  } finally {
    server.close()
  }
}

// What express.json() does: reads the stream to its end, then sets req.body to the parse.
function jsonParser(req, next) {
  const chunks = []
  req.on('data', (chunk) => chunks.push(chunk))
  req.on('end', () => {
    req.body = JSON.parse(Buffer.concat(chunks).toString('utf8'))
    next()
  })
}

test('a body parser mounted before the middleware is a ConfigError for next, not a hang', async () => {
  const body = '{"instance_id":"acme-001","db_ok":true,"redis_ok":false,"storage_ok":true,"jobs_failed":0}'
  const headers = new fleet.Signer('s3cret').headers('msg_parsed', body)
  await withMiddleware({ secrets: { 'acme-001': 's3cret' } }, jsonParser, async (port, passed) => {
    const res = await fetch(`http://127.0.0.1:${port}/`, { method: 'POST', body, headers, signal: AbortSignal.timeout(5000) })
    assert.equal(res.status, 500)
    assert.equal(passed.length, 1)
    assert.ok(passed[0].err instanceof fleet.ConfigError)
    assert.match(passed[0].err.message, /before any body parser/)
  })
})

test('an onRefused that throws goes to next instead of ending the process', async () => {
  const broken = new Error('logger is down')
  const options = { secrets: { 'acme-001': 's3cret' }, onRefused: () => { throw broken } }
  await withMiddleware(options, (req, next) => next(), async (port, passed) => {
    const res = await fetch(`http://127.0.0.1:${port}/`, { method: 'POST', body: '{"instance_id":"acme-001"}', signal: AbortSignal.timeout(5000) })
    assert.equal(res.status, 500)
    assert.deepEqual(passed.map((call) => call.err), [broken])
  })
})

test('the middleware refuses the same signed v1 message twice, not a retried delivery', async () => {
  const body = '{"instance_id":"acme-001","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0}'
  const signer = new fleet.Signer('s3cret')
  const now = Math.floor(Date.now() / 1000)
  const refused = []
  const options = { secrets: { 'acme-001': 's3cret' }, onRefused: (e) => refused.push(e.kind) }
  await withMiddleware(options, (req, next) => next(), async (port, passed) => {
    const send = (headers) => fetch(`http://127.0.0.1:${port}/`, { method: 'POST', body, headers }).then((r) => r.status)
    const first = signer.headers('msg_once', body, now)
    assert.equal(await send(first), 200)
    assert.equal(await send(first), 401)
    assert.equal(await send(signer.headers('msg_once', body, now + 1)), 200)
    assert.equal(await send({ 'x-agent-signature': signer.signV0(body) }), 200)
    assert.deepEqual(passed.map(({ fleet }) => [fleet.scheme, fleet.messageId]), [['v1', 'msg_once'], ['v1', 'msg_once'], ['v0', undefined]])
  })
  assert.deepEqual(refused, ['replay'])
})
