"""fleet: sign and verify agent requests, validate heartbeats, verify release manifests.

The work is done by fleet-core (Rust); this package is its Python face.
"""

from fleet._fleet import (
    Agent,
    TOLERANCE_SECONDS,
    ConfigError,
    FleetError,
    InvalidSignature,
    ManifestError,
    PayloadTooLarge,
    Signer,
    ValidationError,
    Verifier,
    compare_digest,
    sign_v0,
    validate_heartbeat,
    verify_manifest,
)

__all__ = [
    "Agent",
    "TOLERANCE_SECONDS",
    "ConfigError",
    "FleetError",
    "InvalidSignature",
    "ManifestError",
    "PayloadTooLarge",
    "Signer",
    "ValidationError",
    "Verifier",
    "compare_digest",
    "sign_v0",
    "validate_heartbeat",
    "verify_manifest",
]
