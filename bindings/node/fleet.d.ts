/// <reference types="node" />
// Every function throws a TypeError (code ERR_INVALID_ARG_TYPE) for an argument of the wrong
// type, and a RangeError for a time in milliseconds where Unix seconds are expected; the
// FleetError classes below are for what the inputs say, not their types.
import type { IncomingMessage, ServerResponse } from 'node:http'

/** A request or message body: the bytes as received (a Uint8Array works too), or their text. */
export type Body = Buffer | Uint8Array | string
/**
 * Request headers, names in any case: Node's `req.headers` (repeated headers as arrays), a
 * Fetch `Headers` or a Map, `[name, value]` pairs, or Node's flat `req.rawHeaders`.
 */
export type Headers =
  | Record<string, string | string[] | number | undefined>
  | Iterable<readonly [string, string]>
  | readonly string[]
export type SignatureErrorKind =
  | 'missing_header' | 'malformed_header' | 'timestamp_out_of_tolerance' | 'no_secret'
  | 'missing_instance_id' | 'signature_mismatch' | 'v0_disabled'
  /** Only from fleetMiddleware: the very same signed v1 message again. */
  | 'replay'
export type ManifestErrorKind = 'malformed' | 'bad_encoding' | 'scheme_not_accepted' | 'signature_mismatch'

/** Base class of every fleet error. */
export declare class FleetError extends Error {
  /** Why, as a stable machine-readable string. */
  readonly kind: string
}
/** A signed request was refused; `kind` says why. Answer it with one generic 401. */
export declare class InvalidSignature extends FleetError {
  readonly kind: SignatureErrorKind
}
/** A payload is invalid: every problem with its field path. */
export declare class ValidationError extends FleetError {
  /** Every problem, e.g. `{ path: 'job_failures[2].message', message: '…' }`; path '' is the body. */
  readonly errors: Array<{ path: string; message: string }>
  /** The paths of `errors`. */
  readonly paths: string[]
}
/** A payload is larger than the limit (`errors` is empty). */
export declare class PayloadTooLarge extends ValidationError {}
/** A release manifest was refused. */
export declare class ManifestError extends FleetError {
  readonly kind: ManifestErrorKind
}
/**
 * Configuration that cannot work: unusable or missing secrets or keys, or (passed to `next`
 * by the middleware) a body parser mounted before `fleetMiddleware`. Never echoes a secret.
 */
export declare class ConfigError extends FleetError {}

/** The default v1 timestamp tolerance in seconds. */
export declare const TOLERANCE_SECONDS: number

/** v0 signature (the `x-agent-signature` value): lowercase hex HMAC-SHA256 of `body`. */
export declare function signV0(secret: string, body: Body): string

/** Signs messages with one secret (`whsec_<base64>` or any UTF-8 text). */
export declare class Signer {
  /** Throws ConfigError when the secret is empty or a malformed `whsec_` value. */
  constructor(secret: string)
  /** The `webhook-signature` value (`v1,<base64>`) of `{msgId}.{timestamp}.{body}`; `timestamp` in Unix seconds. */
  sign(msgId: string, timestamp: number, body: Body): string
  /** The three v1 headers to send with `body`; `timestamp` (Unix seconds) defaults to now. */
  headers(msgId: string, body: Body, timestamp?: number | null): Record<'webhook-id' | 'webhook-timestamp' | 'webhook-signature', string>
  /** The v0 `x-agent-signature` value. */
  signV0(body: Body): string
  /** Checks v1 headers against this secret; throws InvalidSignature. `now`: Unix seconds, default now. */
  verify(body: Body, headers: Headers, now?: number | null): void
}

/** What a verified request proved. */
export interface VerifiedRequest {
  /** The instance that signed the request. */
  instanceId: string
  scheme: 'v0' | 'v1'
  /** The `webhook-id`; v1 only. */
  msgId?: string
  /** The `webhook-timestamp` (Unix seconds); v1 only. */
  timestamp?: number
}

/** Options of a Verifier. */
export interface VerifierOptions {
  /** Accept v0 (`x-agent-signature`) requests; default true, as existing ERP agents send v0. */
  allowV0?: boolean
  /** v1 timestamp tolerance in seconds; default TOLERANCE_SECONDS. */
  tolerance?: number
}

/**
 * Verifies agent requests: finds `instance_id` in the raw body, resolves its secrets and
 * checks the signature in constant time. Parse the body only after it returns.
 */
export declare class Verifier {
  /**
   * `secrets`: instance id → secret or [secrets] (rotation), or that map's JSON text as in
   * CONTROL_PLANE_AGENT_SECRETS; `fallback`: the shared CONTROL_PLANE_AGENT_TOKEN, for any
   * instance not in the map. Throws ConfigError when a secret is unusable or there is none.
   */
  constructor(secrets?: Record<string, string | string[]> | string | null, fallback?: string | null, options?: VerifierOptions | null)
  /** Returns the instance id that signed the request, or throws InvalidSignature. `now`: Unix seconds, default now. */
  verify(body: Body, headers: Headers, now?: number | null): string
  /** Like `verify`, with what a replay check needs: the scheme, and the v1 message id and timestamp. */
  verifyRequest(body: Body, headers: Headers, now?: number | null): VerifiedRequest
  /** Like `verify`, on the libuv thread pool (for large bodies); rejects with InvalidSignature. */
  verifyAsync(body: Body, headers: Headers, now?: number | null): Promise<string>
}

/** A heartbeat as validated: every wire field plus unknown keys. */
export interface Heartbeat {
  instance_id: string
  db_ok: boolean
  redis_ok: boolean
  storage_ok: boolean
  jobs_failed: number
  [field: string]: unknown
}

/** Validates a heartbeat body; returns it parsed, unknown keys kept. Throws ValidationError or PayloadTooLarge. */
export declare function validateHeartbeat(body: Body): Heartbeat

/** A release manifest as verified. */
export interface SignedManifest {
  version: string
  sha: string
  channel: string
  migrations_required: boolean
  breaking_changes: boolean
  released_at: string
  signature: string
  [field: string]: unknown
}

/**
 * Verifies a release manifest (object, JSON text or Buffer) against base64 Ed25519 public
 * keys and, in compatibility mode, the ERP's HMAC secret. Returns it as an object; throws
 * ManifestError, or ConfigError for an unusable key.
 */
export declare function verifyManifest(manifest: object | string | Buffer, publicKeys: string[], hmacSecret?: string | null): SignedManifest

/** What `fleetMiddleware` sets on `req.fleet` once a request verified. */
export interface FleetContext {
  /** The instance that signed the request. */
  instanceId: string
  /** v0 requests carry no message id and cannot be told from a replay. */
  scheme: 'v0' | 'v1'
  /**
   * The v1 `webhook-id`. The middleware refuses the very same message again; a retried
   * delivery (same id, fresh timestamp) passes, so store the id to apply a message once.
   */
  messageId?: string
  /** The parsed body (the heartbeat, when `heartbeat: true`). */
  body: unknown
  /** The validated heartbeat, when `heartbeat: true`. */
  heartbeat?: Heartbeat
}

/** A request as the middleware sees it: `body` or `rawBody` may already hold the raw bytes. */
export interface FleetRequest extends IncomingMessage {
  body?: unknown
  rawBody?: Buffer
  fleet?: FleetContext
}

declare global {
  namespace Express {
    interface Request {
      /** Set by `fleetMiddleware` (`@fleet-sdk/node`) once the signature verified. */
      fleet?: FleetContext
    }
  }
}

/** Options of `fleetMiddleware`: a `verifier`, or `secrets`/`fallback`/`allowV0` to build one. */
export interface MiddlewareOptions {
  /** A ready verifier; `secrets`, `fallback` and `allowV0` are then ignored. */
  verifier?: Verifier
  /** As the Verifier's `secrets`, e.g. process.env.CONTROL_PLANE_AGENT_SECRETS. */
  secrets?: Record<string, string | string[]> | string | null
  /** As the Verifier's `fallback`, e.g. process.env.CONTROL_PLANE_AGENT_TOKEN. */
  fallback?: string | null
  /** Accept v0 signatures; default true. */
  allowV0?: boolean
  /** Larger bodies get a 413; default 1 MiB. */
  maxBodyBytes?: number
  /** Validate the body as a heartbeat (422 with field paths when invalid). */
  heartbeat?: boolean
  /** Called with the refusal reason (the client only sees a generic 401); what it throws goes to `next`. */
  onRefused?: (err: InvalidSignature, req: FleetRequest) => void
}

/**
 * Express-style middleware for agent requests: reads the raw body (or takes a Buffer
 * `req.body` from `express.raw()`, or `req.rawBody`), verifies it before anything parses it,
 * sets `req.fleet` and calls `next()`. Refusals are answered here: 401 (also for a v1 message
 * seen before by this process), 413, 422 (with field paths), 400 for a broken upload. `next(err)` gets only the app's own mistakes: a ConfigError
 * when a body parser read the body first, or what `onRefused` threw. Throws ConfigError at
 * once when the secrets are unusable or missing.
 */
export declare function fleetMiddleware(
  options?: MiddlewareOptions,
): (req: FleetRequest, res: ServerResponse, next: (err?: unknown) => void) => void
