// Compiled by `tsc` (never run): the declared surface must accept what users write.
import { fleetMiddleware, InvalidSignature, Signer, signV0, validateHeartbeat, Verifier, verifyManifest } from '../fleet'
import type { FleetContext } from '../fleet'
import * as native from '../index'

const body = Buffer.from('{"instance_id":"a"}')
const signer = new Signer('secret')
const headers = signer.headers('msg_1', body)
const id: string = new Verifier({ a: ['old', 'new'] }, null, { allowV0: false }).verify(body, headers)
const later: Promise<string> = new Verifier('{"a":"x"}').verifyAsync(body, headers, 1_700_000_000)
const forms: string[] = [new Headers(headers), new Map(Object.entries(headers)), Object.entries(headers), ['webhook-id', 'msg_1']].map((h) => new Verifier({ a: 'x' }).verify(body, h))
const request = new Verifier({ a: 'x' }).verifyRequest(new Uint8Array(body), headers)
const replayKey: string | undefined = request.scheme === 'v1' ? request.msgId : undefined
const hex: string = signV0('secret', body)
const hb = validateHeartbeat(body)
const ok: boolean = hb.db_ok
const manifest = verifyManifest({ version: '1' }, ['key'])
const version: string = manifest.version
const mw = fleetMiddleware({ secrets: { a: 's' }, heartbeat: true, onRefused: (e: InvalidSignature) => e.kind === 'replay' })
// Express handlers see req.fleet through the global Express.Request augmentation.
const expressReq: Express.Request = {}
const context: FleetContext | undefined = expressReq.fleet
const nativeHex: string = native.signV0('secret', body)
void [id, later, forms, replayKey, hex, ok, version, mw, context, nativeHex]
