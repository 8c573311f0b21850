'use strict'
// @fleet-sdk/node: typed errors, object-friendly constructors and an Express-style
// middleware over the native addon (index.js, built by napi-rs from fleet-core).

const native = require('./index.js')

const TOLERANCE_SECONDS = 300

/** Base class of every fleet error. */
class FleetError extends Error {
  constructor(message, kind) {
    super(message)
    this.name = this.constructor.name
    this.kind = kind
  }
}
/** A signed request was refused; `kind` says why (e.g. 'signature_mismatch'). */
class InvalidSignature extends FleetError {}
/** A payload is invalid; `errors` lists {path, message}, `paths` the paths. */
class ValidationError extends FleetError {
  constructor(message, errors) {
    super(message, 'validation')
    this.errors = errors
    this.paths = errors.map((e) => e.path)
  }
}
/** A payload is larger than the limit. */
class PayloadTooLarge extends ValidationError {}
/** A release manifest was refused; `kind` says why. */
class ManifestError extends FleetError {}
/** Configuration that cannot work: unusable secrets or keys, or a body parser mounted before the middleware. */
class ConfigError extends FleetError {}

const SIGNATURE_KINDS = new Set([
  'missing_header', 'malformed_header', 'timestamp_out_of_tolerance', 'no_secret',
  'missing_instance_id', 'signature_mismatch', 'v0_disabled',
])
const MANIFEST_KINDS = new Set(['malformed', 'bad_encoding', 'scheme_not_accepted', 'signature_mismatch'])

// The addon reports `<kind>\u001f<message>`; turn that into the right class.
function translate(err, family) {
  const text = String(err && err.message)
  const cut = text.indexOf('\u001f')
  if (cut < 0) return err
  const kind = text.slice(0, cut)
  const message = text.slice(cut + 1)
  if (kind === 'config') return new ConfigError(message, kind)
  if (kind === 'validation') {
    const errors = JSON.parse(message)
    const summary = errors.map((e) => `${e.path || '(body)'}: ${e.message}`).join('; ')
    return new ValidationError(`${errors.length} invalid field(s): ${summary}`, errors)
  }
  if (kind === 'too_large') return new PayloadTooLarge(message, [])
  if (family === 'manifest' && MANIFEST_KINDS.has(kind)) return new ManifestError(message, kind)
  if (SIGNATURE_KINDS.has(kind)) return new InvalidSignature(message, kind)
  return new FleetError(message, kind)
}

function call(family, fn) {
  try {
    return fn()
  } catch (err) {
    throw translate(err, family)
  }
}

// Argument checks: napi's own conversion errors name Rust types ("Value is none of these
// types `Vec<u8>`, `String`") instead of the argument, and a wrong `now` or header shape
// would otherwise surface as a misleading InvalidSignature.
function invalidArg(name, expected, value, hint = '') {
  const got = value === null ? 'null' : Array.isArray(value) ? 'an array' : typeof value === 'object' ? 'an object' : typeof value
  const err = new TypeError(`${name} must be ${expected}, got ${got}${hint}`)
  err.code = 'ERR_INVALID_ARG_TYPE'
  return err
}

function string(name, value) {
  if (typeof value !== 'string') throw invalidArg(name, 'a string', value)
  return value
}

function optionalString(name, value) {
  return value == null ? null : string(name, value)
}

function bodyArg(body) {
  if (typeof body === 'string' || body instanceof Uint8Array) return body
  const parsed = body !== null && typeof body === 'object'
  throw invalidArg('body', 'the raw body as a Buffer or string', body, parsed ? ' (pass the bytes as received: a signature covers those, not a parsed object)' : '')
}

// Unix seconds, as the wire carries them; Date.now() milliseconds would fail every
// tolerance check with a misleading timestamp_out_of_tolerance.
function seconds(name, value) {
  if (typeof value !== 'number' || !Number.isFinite(value)) throw invalidArg(name, 'a number of Unix seconds', value)
  if (Math.abs(value) >= 1e11) throw new RangeError(`${name} must be Unix seconds, got ${value} (milliseconds? use Math.floor(Date.now() / 1000))`)
  return value
}

function optionalSeconds(name, value) {
  return value == null ? null : seconds(name, value)
}

/**
 * Request headers as lowercase name → value. Takes Node's `req.headers` (values may be
 * arrays), a Fetch `Headers` or a Map, [name, value] pairs, or Node's flat `req.rawHeaders`;
 * repeated names are joined with a space, as a signature list is.
 */
function normalizeHeaders(headers) {
  // A Map, so that names such as `constructor` are not taken for an object's own keys.
  const out = new Map()
  const add = (name, value) => {
    if (value === undefined || value === null) return
    const key = String(name).toLowerCase()
    const text = Array.isArray(value) ? value.join(' ') : String(value)
    out.set(key, out.has(key) ? `${out.get(key)} ${text}` : text)
  }
  const expected = 'an object, a Headers or Map, [name, value] pairs or req.rawHeaders'
  if (headers == null) return {}
  if (typeof headers !== 'object') throw invalidArg('headers', expected, headers)
  if (Array.isArray(headers)) {
    if (headers.length % 2 === 0 && headers.every((item) => typeof item === 'string')) {
      for (let i = 0; i < headers.length; i += 2) add(headers[i], headers[i + 1])
    } else if (headers.every((item) => Array.isArray(item) && item.length === 2)) {
      for (const [name, value] of headers) add(name, value)
    } else {
      throw invalidArg('headers', expected, headers)
    }
  } else {
    const entries = typeof headers[Symbol.iterator] === 'function' ? headers : Object.entries(headers)
    for (const [name, value] of entries) add(name, value)
  }
  return Object.fromEntries(out)
}

/** v0 signature: lowercase hex HMAC-SHA256 of `body`. */
function signV0(secret, body) {
  return call('signature', () => native.signV0(string('secret', secret), bodyArg(body)))
}

/** Signs messages with one secret (v1 Standard Webhooks headers, or v0). */
class Signer {
  constructor(secret) {
    this._inner = call('signature', () => new native.Signer(string('secret', secret)))
  }
  sign(msgId, timestamp, body) {
    return this._inner.sign(string('msgId', msgId), seconds('timestamp', timestamp), bodyArg(body))
  }
  headers(msgId, body, timestamp) {
    return this._inner.headers(string('msgId', msgId), bodyArg(body), optionalSeconds('timestamp', timestamp))
  }
  signV0(body) {
    return this._inner.signV0(bodyArg(body))
  }
  verify(body, headers, now) {
    const args = [bodyArg(body), normalizeHeaders(headers), optionalSeconds('now', now)]
    call('signature', () => this._inner.verify(...args))
  }
  toString() {
    return 'Signer([redacted])'
  }
}

/**
 * Verifies agent requests. `secrets`: an object instanceId → secret | secret[], or the JSON
 * text of CONTROL_PLANE_AGENT_SECRETS; `fallback`: CONTROL_PLANE_AGENT_TOKEN.
 */
class Verifier {
  constructor(secrets, fallback, options) {
    if (secrets != null && typeof secrets !== 'object' && typeof secrets !== 'string') {
      throw invalidArg('secrets', 'an object or its JSON text', secrets)
    }
    if (options != null && typeof options !== 'object') throw invalidArg('options', 'an object', options)
    const json = secrets == null ? null : typeof secrets === 'string' ? secrets : JSON.stringify(secrets)
    const token = optionalString('fallback', fallback)
    this._inner = call('signature', () => new native.Verifier(json, token, options ?? null))
    this._tolerance = options?.tolerance ?? TOLERANCE_SECONDS
  }
  /** Returns the instance id, or throws InvalidSignature. */
  verify(body, headers, now) {
    const args = [bodyArg(body), normalizeHeaders(headers), optionalSeconds('now', now)]
    return call('signature', () => this._inner.verify(...args))
  }
  /** Like verify; returns {instanceId, scheme, msgId, timestamp} (the last two v1 only). */
  verifyRequest(body, headers, now) {
    const args = [bodyArg(body), normalizeHeaders(headers), optionalSeconds('now', now)]
    return call('signature', () => this._inner.verifyRequest(...args))
  }
  /** Like verify, off the main thread. */
  async verifyAsync(body, headers, now) {
    const raw = bodyArg(body)
    const args = [Buffer.isBuffer(raw) ? raw : Buffer.from(raw), normalizeHeaders(headers), optionalSeconds('now', now)]
    try {
      return await this._inner.verifyAsync(...args)
    } catch (err) {
      throw translate(err, 'signature')
    }
  }
  toString() {
    return 'Verifier([redacted])'
  }
}

/** Validates a heartbeat body; returns it as an object (unknown keys kept). */
function validateHeartbeat(body) {
  const raw = bodyArg(body)
  return JSON.parse(call('validation', () => native.validateHeartbeatJson(raw)))
}

/** Verifies a release manifest (object or JSON text); returns it as an object. */
function verifyManifest(manifest, publicKeys, hmacSecret) {
  if (manifest === null || (typeof manifest !== 'object' && typeof manifest !== 'string')) {
    throw invalidArg('manifest', 'an object, JSON text or a Buffer', manifest)
  }
  if (!Array.isArray(publicKeys) || !publicKeys.every((key) => typeof key === 'string')) {
    throw invalidArg('publicKeys', 'an array of base64 strings', publicKeys)
  }
  const text = typeof manifest === 'string' ? manifest : Buffer.isBuffer(manifest) ? manifest.toString('utf8') : JSON.stringify(manifest)
  const secret = optionalString('hmacSecret', hmacSecret)
  return JSON.parse(call('manifest', () => native.verifyManifestJson(text, publicKeys, secret)))
}

const BODY_ALREADY_READ =
  'fleetMiddleware: another middleware (express.json() or similar) has already read the request body, ' +
  'so the signed bytes are gone. Mount fleetMiddleware before any body parser on this route, or keep ' +
  "the raw bytes: express.raw({ type: '*/*' }) (req.body) or a parser's verify hook (req.rawBody)."

function readBody(req, limit) {
  if (Buffer.isBuffer(req.body)) return Promise.resolve(req.body)
  if (Buffer.isBuffer(req.rawBody)) return Promise.resolve(req.rawBody)
  // The stream has ended without us: waiting for its 'end' would hang the request forever.
  if (req.readableEnded) return Promise.reject(new ConfigError(BODY_ALREADY_READ, 'config'))
  return new Promise((resolve, reject) => {
    const chunks = []
    let size = 0
    req.on('data', (chunk) => {
      size += chunk.length
      if (size <= limit) {
        chunks.push(chunk)
      } else if (size > limit * 16) {
        // Past any honest sender: stop reading.
        req.destroy()
      }
      // Between the limit and the cut-off, keep draining so the client reads our 413.
    })
    req.on('end', () => (size > limit ? reject(new PayloadTooLarge(`body exceeds ${limit} bytes`, [])) : resolve(Buffer.concat(chunks))))
    req.on('error', reject)
  })
}

function reply(res, status, code, message, extra) {
  res.statusCode = status
  res.setHeader('content-type', 'application/json')
  res.end(JSON.stringify({ error: { code, message, ...extra } }))
}

/**
 * Express-style middleware for agent requests: reads the raw body (or uses `req.body` when it
 * is a Buffer, e.g. from `express.raw()`), verifies the signature before anything parses it,
 * then sets `req.fleet = {instanceId, scheme, messageId, body}` (and `heartbeat` when
 * `heartbeat: true`). Refusals: 401 with one generic message (also for a replayed v1
 * message), 413 over `maxBodyBytes`, 422 with field paths.
 * Mistakes of the app go to `next(err)`: a ConfigError when a body parser ran first, or what
 * `onRefused` threw.
 */
function fleetMiddleware(options) {
  const opts = options || {}
  const verifier = opts.verifier || new Verifier(opts.secrets, opts.fallback, { allowV0: opts.allowV0 ?? true })
  const limit = opts.maxBodyBytes ?? 1024 * 1024
  const unauthorized = [401, 'unauthorized', 'invalid or missing signature']

  // v1 messages seen, kept while their timestamp is within tolerance (after that the verifier
  // refuses them anyway). The very same signed message again is a replay; a retried delivery
  // is re-signed with a fresh timestamp and passes, with req.fleet.messageId for the app to
  // apply it once. In memory, so per process.
  const seen = new Map()
  function replayed({ instanceId, msgId, timestamp }) {
    if (msgId === undefined) return false
    const now = Math.floor(Date.now() / 1000)
    // Inserted roughly in expiry order: drop the expired head.
    for (const [key, expiry] of seen) {
      if (expiry >= now) break
      seen.delete(key)
    }
    const key = JSON.stringify([instanceId, msgId, timestamp])
    if (seen.has(key)) return true
    seen.set(key, timestamp + verifier._tolerance)
    return false
  }

  // Sets req.fleet, or returns the refusal as reply()'s arguments.
  function admit(req, raw) {
    if (raw.length > limit) return [413, 'payload_too_large', `body exceeds ${limit} bytes`]
    let verified
    try {
      verified = verifier.verifyRequest(raw, req.headers)
      if (replayed(verified)) throw new InvalidSignature('this signed message was already received', 'replay')
    } catch (err) {
      if (typeof opts.onRefused === 'function') opts.onRefused(err, req)
      return unauthorized
    }
    let heartbeat, body
    try {
      heartbeat = opts.heartbeat ? validateHeartbeat(raw) : undefined
      body = heartbeat ?? JSON.parse(raw.toString('utf8'))
    } catch (err) {
      if (err instanceof ValidationError) return [422, 'invalid_payload', err.message, { fields: err.errors }]
      return [422, 'invalid_payload', 'body is not valid JSON']
    }
    const { instanceId, scheme, msgId } = verified
    if (body && body.instance_id !== instanceId) return unauthorized
    req.fleet = { instanceId, scheme, messageId: msgId, body, heartbeat }
  }

  return function fleetVerify(req, res, next) {
    readBody(req, limit).then(
      (raw) => {
        let refusal
        try {
          refusal = admit(req, raw)
        } catch (err) {
          // A throwing onRefused belongs to the app's error handler; unhandled here, it
          // would leave the request hanging and end the process.
          return next(err)
        }
        if (refusal) return reply(res, ...refusal)
        next()
      },
      (err) => {
        if (err instanceof ConfigError) return next(err)
        if (err instanceof PayloadTooLarge) return reply(res, 413, 'payload_too_large', err.message)
        reply(res, 400, 'bad_request', err.message)
      },
    )
  }
}

module.exports = {
  FleetError,
  InvalidSignature,
  ValidationError,
  PayloadTooLarge,
  ManifestError,
  ConfigError,
  Signer,
  Verifier,
  signV0,
  validateHeartbeat,
  verifyManifest,
  fleetMiddleware,
  TOLERANCE_SECONDS,
}
