'use strict'
// @fleet-sdk/node: typed errors, object-friendly constructors and an Express-style
// middleware over the native addon (index.js, built by napi-rs from fleet-core).

const native = require('./index.js')

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
/** Secrets or keys that cannot be used. */
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

/** Header values from Node (string | string[] | undefined) as plain strings. */
function normalizeHeaders(headers) {
  const out = {}
  for (const [name, value] of Object.entries(headers || {})) {
    if (value === undefined || value === null) continue
    out[name.toLowerCase()] = Array.isArray(value) ? value.join(' ') : String(value)
  }
  return out
}

/** v0 signature: lowercase hex HMAC-SHA256 of `body`. */
function signV0(secret, body) {
  return call('signature', () => native.signV0(secret, body))
}

/** Signs messages with one secret (v1 Standard Webhooks headers, or v0). */
class Signer {
  constructor(secret) {
    this._inner = call('signature', () => new native.Signer(secret))
  }
  sign(msgId, timestamp, body) {
    return this._inner.sign(msgId, timestamp, body)
  }
  headers(msgId, body, timestamp) {
    return this._inner.headers(msgId, body, timestamp)
  }
  signV0(body) {
    return this._inner.signV0(body)
  }
  verify(body, headers, now) {
    call('signature', () => this._inner.verify(body, normalizeHeaders(headers), now))
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
    const json = secrets == null ? null : typeof secrets === 'string' ? secrets : JSON.stringify(secrets)
    this._inner = call('signature', () => new native.Verifier(json, fallback ?? null, options ?? null))
  }
  /** Returns the instance id, or throws InvalidSignature. */
  verify(body, headers, now) {
    return call('signature', () => this._inner.verify(body, normalizeHeaders(headers), now))
  }
  /** Like verify, off the main thread. */
  async verifyAsync(body, headers, now) {
    const buffer = Buffer.isBuffer(body) ? body : Buffer.from(body)
    try {
      return await this._inner.verifyAsync(buffer, normalizeHeaders(headers), now)
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
  return JSON.parse(call('validation', () => native.validateHeartbeatJson(body)))
}

/** Verifies a release manifest (object or JSON text); returns it as an object. */
function verifyManifest(manifest, publicKeys, hmacSecret) {
  const text = typeof manifest === 'string' ? manifest : Buffer.isBuffer(manifest) ? manifest.toString('utf8') : JSON.stringify(manifest)
  return JSON.parse(call('manifest', () => native.verifyManifestJson(text, publicKeys, hmacSecret ?? null)))
}

function readBody(req, limit) {
  if (Buffer.isBuffer(req.body)) return Promise.resolve(req.body)
  if (Buffer.isBuffer(req.rawBody)) return Promise.resolve(req.rawBody)
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
 * then sets `req.fleet = {instanceId, body}` (and `heartbeat` when `heartbeat: true`).
 * Refusals: 401 with one generic message, 413 over `maxBodyBytes`, 422 with field paths.
 */
function fleetMiddleware(options) {
  const opts = options || {}
  const verifier = opts.verifier || new Verifier(opts.secrets, opts.fallback, { allowV0: opts.allowV0 ?? true })
  const limit = opts.maxBodyBytes ?? 1024 * 1024
  return function fleetVerify(req, res, next) {
    readBody(req, limit).then(
      (raw) => {
        if (raw.length > limit) return reply(res, 413, 'payload_too_large', `body exceeds ${limit} bytes`)
        let instanceId
        try {
          instanceId = verifier.verify(raw, req.headers)
        } catch (err) {
          if (typeof opts.onRefused === 'function') opts.onRefused(err, req)
          return reply(res, 401, 'unauthorized', 'invalid or missing signature')
        }
        try {
          const heartbeat = opts.heartbeat ? validateHeartbeat(raw) : undefined
          const body = heartbeat ?? JSON.parse(raw.toString('utf8'))
          if (body && body.instance_id !== instanceId) {
            return reply(res, 401, 'unauthorized', 'invalid or missing signature')
          }
          req.fleet = { instanceId, body, heartbeat }
        } catch (err) {
          if (err instanceof ValidationError) return reply(res, 422, 'invalid_payload', err.message, { fields: err.errors })
          return reply(res, 422, 'invalid_payload', 'body is not valid JSON')
        }
        next()
      },
      (err) => reply(res, err instanceof PayloadTooLarge ? 413 : 400, err instanceof PayloadTooLarge ? 'payload_too_large' : 'bad_request', err.message),
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
  TOLERANCE_SECONDS: 300,
}
