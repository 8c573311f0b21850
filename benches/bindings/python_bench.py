"""fleet's Python binding beside Python's own hmac module, same process, same 1 KiB body.

    .venv/bin/python benches/bindings/python_bench.py

Prints ns per call and the speed-up (peer time / fleet time) for each pair.
"""

import base64
import hashlib
import hmac
import json
import timeit

import fleet

SECRET = "agent-secret-acme-0123456789"
KEY = SECRET.encode()
HEAD = '{"instance_id":"acme-001","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0,"pad":"'
BODY = (HEAD + "x" * (1024 - len(HEAD) - 2) + '"}').encode()
assert len(BODY) == 1024
NOW = 1_767_225_600
V0 = hmac.new(KEY, BODY, hashlib.sha256).hexdigest()
SIGNER = fleet.Signer(SECRET)
V1_HEADERS = SIGNER.headers("msg_2a7Jd1", BODY, timestamp=NOW)
V0_HEADERS = {"x-agent-signature": V0}
VERIFIER = fleet.Verifier({"acme-001": SECRET})
SECRETS = {"acme-001": KEY}


def peer_sign_v0():
    return hmac.new(KEY, BODY, hashlib.sha256).hexdigest()


def peer_verify_v0():
    # What the ERP control plane does, with a constant-time comparison: find the secret by
    # the parsed instance_id, recompute, compare.
    key = SECRETS[json.loads(BODY)["instance_id"]]
    expected = hmac.new(key, BODY, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, V0_HEADERS["x-agent-signature"])


def peer_verify_v1():
    headers = V1_HEADERS
    if abs(NOW - int(headers["webhook-timestamp"])) > 300:
        return False
    key = SECRETS[json.loads(BODY)["instance_id"]]
    signed = f'{headers["webhook-id"]}.{headers["webhook-timestamp"]}.'.encode() + BODY
    expected = hmac.new(key, signed, hashlib.sha256).digest()
    for entry in headers["webhook-signature"].split(" "):
        version, _, encoded = entry.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(encoded), expected):
            return True
    return False


def best_ns(fn, number=20000, repeat=7):
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


def main():
    assert peer_verify_v0() and peer_verify_v1()
    assert fleet.sign_v0(SECRET, BODY) == peer_sign_v0()
    pairs = [
        ("sign_v0", lambda: fleet.sign_v0(SECRET, BODY), peer_sign_v0),
        ("Signer.sign_v0", lambda: SIGNER.sign_v0(BODY), peer_sign_v0),
        ("Verifier.verify v0", lambda: VERIFIER.verify(BODY, V0_HEADERS, NOW), peer_verify_v0),
        ("Verifier.verify v1", lambda: VERIFIER.verify(BODY, V1_HEADERS, NOW), peer_verify_v1),
    ]
    print(f"{'operation':<22} {'fleet':>10} {'hmac module':>12} {'speed-up':>9}")
    for name, ours, peer in pairs:
        a, b = best_ns(ours), best_ns(peer)
        print(f"{name:<22} {a:>7.0f} ns {b:>9.0f} ns {b / a:>8.2f}x")


if __name__ == "__main__":
    main()
