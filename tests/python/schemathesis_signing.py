"""schemathesis hook for `scripts/schemathesis`: signs each request to an agent route.

Agent routes (`security: agentSignatureV1` in `/openapi.json`) answer 401 to anything
unsigned, so without this the generated bodies never reach the code behind them. The hook
serializes the generated body itself, so that the bytes it signs are the bytes sent, and
signs them as an agent would: v1 (Standard Webhooks), with the control plane's shared agent
secret from `FLEET_SCHEMATHESIS_AGENT_SECRET`, a fresh message id and the current time.
"""

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from typing import Any

import schemathesis
from schemathesis.core import NotSet
from schemathesis.core.parameters import ParameterLocation

SECRET = os.environ["FLEET_SCHEMATHESIS_AGENT_SECRET"].encode()


def _is_agent_route(case: Any) -> bool:
    security = case.operation.definition.raw.get("security") or []
    return any("agentSignatureV1" in requirement for requirement in security)


def _headers_are_negative(case: Any) -> bool:
    """Whether schemathesis broke the headers on purpose: then they stay as generated, and
    the control plane must refuse them (401)."""
    meta = getattr(case, "_meta", None)
    return meta is not None and meta.is_negative_at(ParameterLocation.HEADER)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if not _is_agent_route(case) or _headers_are_negative(case):
        return
    if isinstance(case.body, NotSet):
        body = b""
    elif isinstance(case.body, bytes):
        body = case.body
    else:
        body = json.dumps(case.body).encode()
    msg_id = f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time())
    mac = hmac.new(SECRET, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    # The generated signature headers (the document lists them as parameters) give way.
    headers = {
        name: value
        for name, value in (case.headers or {}).items()
        if name.lower() not in ("x-agent-signature", "webhook-id", "webhook-timestamp", "webhook-signature")
    }
    headers.update(
        {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": "v1," + base64.b64encode(mac).decode(),
        }
    )
    case.headers = headers
    # A body passed here replaces the generated one, so schemathesis sends these bytes.
    kwargs["data"] = body
