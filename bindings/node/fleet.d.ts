/// <reference types="node" />
import type { IncomingMessage, ServerResponse } from 'node:http'

export type Body = Buffer | string
export type Headers = Record<string, string | string[] | undefined>
export type SignatureErrorKind =
  | 'missing_header' | 'malformed_header' | 'timestamp_out_of_tolerance' | 'no_secret'
  | 'missing_instance_id' | 'signature_mismatch' | 'v0_disabled'
export type ManifestErrorKind = 'malformed' | 'bad_encoding' | 'scheme_not_accepted' | 'signature_mismatch'

/** Base class of every fleet error. */
export declare class FleetError extends Error {
  readonly kind: string
}
/** A signed request was refused. */
export declare class InvalidSignature extends FleetError {
  readonly kind: SignatureErrorKind
}
/** A payload is invalid: every problem with its field path. */
export declare class ValidationError extends FleetError {
  readonly errors: Array<{ path: string; message: string }>
  readonly paths: string[]
}
/** A payload is larger than the limit. */
export declare class PayloadTooLarge extends ValidationError {}
/** A release manifest was refused. */
export declare class ManifestError extends FleetError {
  readonly kind: ManifestErrorKind
}
/** Secrets or keys that cannot be used. */
export declare class ConfigError extends FleetError {}

/** v1 timestamp tolerance in seconds. */
export declare const TOLERANCE_SECONDS: number

/** v0 signature: lowercase hex HMAC-SHA256 of `body`. */
export declare function signV0(secret: string, body: Body): string

/** Signs messages with one secret. */
export declare class Signer {
  constructor(secret: string)
  sign(msgId: string, timestamp: number, body: Body): string
  headers(msgId: string, body: Body, timestamp?: number): Record<'webhook-id' | 'webhook-timestamp' | 'webhook-signature', string>
  signV0(body: Body): string
  verify(body: Body, headers: Headers, now?: number): void
}

export interface VerifierOptions {
  allowV0?: boolean
  tolerance?: number
}

/** Verifies agent requests; returns the instance id. */
export declare class Verifier {
  constructor(secrets?: Record<string, string | string[]> | string | null, fallback?: string | null, options?: VerifierOptions)
  verify(body: Body, headers: Headers, now?: number): string
  verifyAsync(body: Body, headers: Headers, now?: number): Promise<string>
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

export declare function validateHeartbeat(body: Body): Heartbeat

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

export declare function verifyManifest(manifest: object | string | Buffer, publicKeys: string[], hmacSecret?: string | null): SignedManifest

export interface FleetRequest extends IncomingMessage {
  body?: unknown
  rawBody?: Buffer
  fleet?: { instanceId: string; body: unknown; heartbeat?: Heartbeat }
}

export interface MiddlewareOptions {
  verifier?: Verifier
  secrets?: Record<string, string | string[]> | string | null
  fallback?: string | null
  allowV0?: boolean
  maxBodyBytes?: number
  /** Validate the body as a heartbeat (422 with field paths when invalid). */
  heartbeat?: boolean
  /** Called with the refusal reason (the client only sees a generic 401). */
  onRefused?: (err: InvalidSignature, req: FleetRequest) => void
}

export declare function fleetMiddleware(
  options?: MiddlewareOptions,
): (req: FleetRequest, res: ServerResponse, next: (err?: unknown) => void) => void
