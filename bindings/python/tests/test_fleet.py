"""The Python surface of fleet, on the shared vectors and against `standardwebhooks`."""

import json
import time
import uuid
from datetime import datetime, timezone
from email.message import Message
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import fleet

VECTORS = Path(__file__).resolve().parents[3] / "tests" / "vectors"


def load(name):
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


SIGNING = load("signing.json")
HEARTBEATS = load("heartbeats.json")
MANIFESTS = load("manifests.json")


def headers_of(case):
    if case["scheme"] == "v0":
        return {"X-Agent-Signature": case["signature"]}
    headers = {"Webhook-Signature": case["signature"]}
    if case["msg_id"] is not None:
        headers["Webhook-Id"] = case["msg_id"]
    if case["timestamp"] is not None:
        headers["Webhook-Timestamp"] = str(case["timestamp"])
    return headers


@pytest.mark.parametrize("case", SIGNING, ids=[c["name"] for c in SIGNING])
def test_signing_vector_through_signer(case):
    body = case["body"].encode()
    signer = fleet.Signer(case["secret"])
    if case["scheme"] == "v0":
        # Signing is deterministic: a valid vector's signature is exactly ours (hex case aside).
        matches = fleet.sign_v0(case["secret"], body) == case["signature"].lower()
        assert matches == case["valid"]
        assert signer.sign_v0(body) == fleet.sign_v0(case["secret"], body)
    elif case["valid"]:
        signer.verify(body, headers_of(case), now=case["now"])
        if " " not in case["signature"]:
            assert signer.sign(case["msg_id"], case["timestamp"], body) == case["signature"]
    else:
        with pytest.raises(fleet.InvalidSignature) as info:
            signer.verify(body, headers_of(case), now=case["now"])
        assert info.value.kind == case["error"]


# The Verifier finds the secret by the body's instance_id, so it applies to vectors whose
# body names one (all but the Standard Webhooks example and the empty object).
ADDRESSED = [c for c in SIGNING if "instance_id" in json.loads(c["body"])]


def test_most_vectors_name_an_instance():
    assert len(ADDRESSED) >= len(SIGNING) - 2


@pytest.mark.parametrize("case", ADDRESSED, ids=[c["name"] for c in ADDRESSED])
def test_signing_vector_through_verifier(case):
    body = case["body"].encode()
    instance = json.loads(case["body"])["instance_id"]
    verifier = fleet.Verifier({instance: case["secret"]})
    if case["valid"]:
        assert verifier.verify(body, headers_of(case), now=case["now"]) == instance
    else:
        with pytest.raises(fleet.InvalidSignature) as info:
            verifier.verify(body, headers_of(case), now=case["now"])
        assert info.value.kind == case["error"]


@pytest.mark.parametrize("case", HEARTBEATS, ids=[c["name"] for c in HEARTBEATS])
def test_heartbeat_vector(case):
    if case["valid"]:
        parsed = fleet.validate_heartbeat(case["body"])
        assert parsed["instance_id"] == json.loads(case["body"])["instance_id"]
    else:
        with pytest.raises(fleet.ValidationError) as info:
            fleet.validate_heartbeat(case["body"].encode())
        assert info.value.paths == case["error_paths"]
        assert [p for p, _ in info.value.errors] == case["error_paths"]


@pytest.mark.parametrize("case", MANIFESTS, ids=[c["name"] for c in MANIFESTS])
def test_manifest_vector(case):
    args = (case["manifest"], case["public_keys"], case["hmac_secret"])
    if case["valid"]:
        assert fleet.verify_manifest(*args)["version"] == case["manifest"]["version"]
    else:
        with pytest.raises(fleet.ManifestError) as info:
            fleet.verify_manifest(*args)
        assert info.value.kind == case["error"]


def test_our_v1_signature_verifies_with_standardwebhooks():
    secret = "agent-secret-acme"
    body = b'{"instance_id":"acme-001","db_ok":true}'
    msg_id = f"msg_{uuid.uuid4().hex}"
    headers = fleet.Signer(secret).headers(msg_id, body)
    assert Webhook(secret.encode()).verify(body, headers)["instance_id"] == "acme-001"
    with pytest.raises(WebhookVerificationError):
        Webhook(b"another").verify(body, headers)


def test_standardwebhooks_signature_verifies_with_us():
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = '{"instance_id":"edge-9","db_ok":true}'
    now = datetime.now(tz=timezone.utc)
    signature = Webhook(secret).sign("msg_sw_1", now, body)
    headers = {"webhook-id": "msg_sw_1", "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature}
    assert fleet.Verifier({"edge-9": secret}).verify(body.encode(), headers) == "edge-9"
    with pytest.raises(fleet.InvalidSignature):
        fleet.Verifier({"edge-9": secret}).verify(body.replace("true", "false").encode(), headers)


def test_verifier_accepts_config_forms_and_rotation():
    body = b'{"instance_id":"a","db_ok":true}'
    old, new = fleet.Signer("old-secret"), fleet.Signer("new-secret")
    rotating = fleet.Verifier('{"a": ["old-secret", "new-secret"]}')
    for signer in (old, new):
        assert rotating.verify(body, signer.headers("m1", body)) == "a"
    fallback = fleet.Verifier(None, "shared")
    assert fallback.verify(body, {"x-agent-signature": fleet.sign_v0("shared", body)}) == "a"
    with pytest.raises(fleet.InvalidSignature) as info:
        fleet.Verifier({"b": "x"}).verify(body, new.headers("m1", body))
    assert info.value.kind == "no_secret"
    strict = fleet.Verifier(None, "shared", allow_v0=False)
    with pytest.raises(fleet.InvalidSignature) as info:
        strict.verify(body, {"x-agent-signature": fleet.sign_v0("shared", body)})
    assert info.value.kind == "v0_disabled"


def test_bad_configuration_is_a_config_error_without_the_secret():
    with pytest.raises(fleet.ConfigError) as info:
        fleet.Verifier({"a": "", "b": "whsec_@@@", "c": "visible-secret-value"})
    assert "visible-secret-value" not in str(info.value)
    with pytest.raises(fleet.ConfigError):
        fleet.Signer("")


def test_exception_hierarchy_and_redacted_repr():
    assert issubclass(fleet.InvalidSignature, fleet.FleetError)
    assert issubclass(fleet.PayloadTooLarge, fleet.ValidationError)
    assert issubclass(fleet.ManifestError, fleet.FleetError)
    assert "hunter2" not in repr(fleet.Signer("hunter2"))
    with pytest.raises(fleet.PayloadTooLarge):
        fleet.validate_heartbeat(b'{"pad":"' + b"x" * (2 * 1024 * 1024) + b'"}')


def test_expired_and_tampered_requests_are_refused():
    body = b'{"instance_id":"a"}'
    signer = fleet.Signer("s")
    headers = signer.headers("m", body, timestamp=int(time.time()) - 3600)
    with pytest.raises(fleet.InvalidSignature) as info:
        fleet.Verifier({"a": "s"}).verify(body, headers)
    assert info.value.kind == "timestamp_out_of_tolerance"
    with pytest.raises(fleet.InvalidSignature) as info:
        fleet.Verifier({"a": "s"}).verify(body, {"x-agent-signature": "abc"})
    assert info.value.kind == "malformed_header"


def test_headers_as_pairs_bytes_or_a_framework_mapping():
    body = b'{"instance_id":"a","db_ok":true}'
    headers = fleet.Signer("s").headers("m1", body)
    verifier = fleet.Verifier({"a": "s"})
    # ASGI hands headers over as a list of (bytes, bytes); some code has (str, str) pairs.
    assert verifier.verify(body, [(k.encode(), v.encode()) for k, v in headers.items()]) == "a"
    assert verifier.verify(body, [(k.title(), v) for k, v in headers.items()]) == "a"
    fleet.Signer("s").verify(body, list(headers.items()))
    # A framework's case-insensitive headers object (the stdlib's, as http.server gives).
    message = Message()
    for name, value in headers.items():
        message[name.upper()] = value
    assert verifier.verify(body, message) == "a"
    for wrong in (None, "webhook-id: m1", 42, [("only-a-name",)]):
        with pytest.raises(TypeError, match="headers must be a mapping or"):
            verifier.verify(body, wrong)
    with pytest.raises(TypeError, match="str or bytes, not int"):
        verifier.verify(body, {"webhook-id": 1})


def test_a_negative_tolerance_is_a_value_error_not_a_panic():
    for tolerance in (-1, -(2**63)):
        with pytest.raises(ValueError, match="tolerance"):
            fleet.Verifier({"a": "s"}, tolerance=tolerance)
    assert fleet.Verifier({"a": "s"}, tolerance=0)


def test_a_verifier_without_any_secret_is_a_config_error():
    # Unset CONTROL_PLANE_AGENT_SECRETS and CONTROL_PLANE_AGENT_TOKEN would otherwise refuse
    # every request with an InvalidSignature that says nothing of the cause.
    for secrets, fallback in ((None, None), ({}, None), ("{}", None)):
        with pytest.raises(fleet.ConfigError, match="CONTROL_PLANE_AGENT_SECRETS"):
            fleet.Verifier(secrets, fallback)
    assert fleet.Verifier({}, "shared")


def test_validate_heartbeat_takes_raw_bytes_and_names_what_it_got_otherwise():
    body = b'{"instance_id":"a","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0}'
    for raw in (body, body.decode(), bytearray(body), memoryview(body)):
        assert fleet.validate_heartbeat(raw)["instance_id"] == "a"
    # A body a framework already parsed cannot be checked against the raw-text limits.
    for parsed in (json.loads(body), None, list(body)):
        with pytest.raises(TypeError, match=f"bytes or str, not {type(parsed).__name__}"):
            fleet.validate_heartbeat(parsed)
