"""The shared vectors, checked by an implementation written independently of fleet-core:
Python's hmac/hashlib/base64 for signatures, `cryptography` for Ed25519, and `json` for the
canonical form. If fleet-core and this file ever disagree, one of them is wrong."""

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
TOLERANCE = 300


def load(name):
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def key_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_"):])
    return secret.encode("utf-8")


def reference_verify(case) -> str | None:
    """Returns None when valid, else the error kind the vectors use."""
    key = key_bytes(case["secret"])
    body = case["body"].encode("utf-8")
    if case["scheme"] == "v0":
        sig = case["signature"].strip()
        if len(sig) != 64:
            return "malformed_header"
        try:
            given = bytes.fromhex(sig)
        except ValueError:
            return "malformed_header"
        expected = hmac.new(key, body, hashlib.sha256).digest()
        return None if hmac.compare_digest(given, expected) else "signature_mismatch"
    if case["msg_id"] is None or case["timestamp"] is None:
        return "missing_header"
    if abs(case["now"] - case["timestamp"]) > TOLERANCE:
        return "timestamp_out_of_tolerance"
    signed = f'{case["msg_id"]}.{case["timestamp"]}.'.encode() + body
    expected = hmac.new(key, signed, hashlib.sha256).digest()
    for entry in case["signature"].split(" "):
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except ValueError:
            continue
        if hmac.compare_digest(given, expected):
            return None
    return "signature_mismatch"


SIGNING = load("signing.json")


@pytest.mark.parametrize("case", SIGNING, ids=[c["name"] for c in SIGNING])
def test_signing_vector(case):
    assert set(case) == {"name", "scheme", "secret", "body", "msg_id", "timestamp", "now", "signature", "valid", "error"}
    got = reference_verify(case)
    assert got == case["error"]
    assert (got is None) == case["valid"]


def test_vectors_cover_the_required_failures():
    errors = {(c["scheme"], c["error"]) for c in SIGNING}
    for needed in [("v0", "signature_mismatch"), ("v0", "malformed_header"), ("v1", "signature_mismatch"),
                   ("v1", "timestamp_out_of_tolerance"), ("v1", "missing_header"), ("v0", None), ("v1", None)]:
        assert needed in errors


MANIFESTS = load("manifests.json")


def canonical(obj) -> str:
    # Equal to RFC 8785 for these vectors: no floats, keys within the BMP.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize("case", MANIFESTS, ids=[c["name"] for c in MANIFESTS])
def test_manifest_vector(case):
    manifest = dict(case["manifest"])
    signature = manifest.pop("signature", None)
    scheme = manifest.pop("signature_scheme", None)
    manifest.pop("key_id", None)
    assert canonical(manifest) == case["canonical"]
    if signature is None:
        assert case["error"] == "malformed"
        return
    if scheme == "ed25519":
        raw = base64.b64decode(signature)
        if len(raw) != 64:
            assert case["error"] == "bad_encoding"
            return
        ok = False
        for encoded in case["public_keys"]:
            try:
                Ed25519PublicKey.from_public_bytes(base64.b64decode(encoded)).verify(raw, case["canonical"].encode())
                ok = True
            except InvalidSignature:
                pass
        assert ok == case["valid"]
        assert ok or case["error"] == "signature_mismatch"
    else:
        if case["hmac_secret"] is None:
            assert case["error"] == "scheme_not_accepted"
            return
        legacy = {k: manifest[k] for k in ["version", "sha", "channel", "migrations_required", "breaking_changes", "released_at"]}
        expected = hmac.new(case["hmac_secret"].encode(), canonical(legacy).encode(), hashlib.sha256).hexdigest()
        assert hmac.compare_digest(expected, signature) == case["valid"]


def test_heartbeat_vectors_are_well_formed():
    for case in load("heartbeats.json"):
        assert set(case) == {"name", "body", "valid", "error_paths"}
        assert case["valid"] == (case["error_paths"] == [])
        if case["valid"]:
            assert isinstance(json.loads(case["body"]), dict)
