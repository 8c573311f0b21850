from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Optional, TypeVar, Union, final, overload

_Probe = TypeVar("_Probe", bound=Callable[[], Optional[bool]])
# A mapping (a dict, or a web framework's headers object) or (name, value) pairs, e.g. ASGI's.
_Headers = Union[Mapping[str, str], Iterable[tuple[Union[str, bytes], Union[str, bytes]]]]

__all__ = [
    "Agent",
    "ConfigError",
    "FleetError",
    "InvalidSignature",
    "ManifestError",
    "PayloadTooLarge",
    "Signer",
    "TOLERANCE_SECONDS",
    "ValidationError",
    "Verifier",
    "compare_digest",
    "sign_v0",
    "validate_heartbeat",
    "verify_manifest",
]

TOLERANCE_SECONDS: int

class FleetError(Exception): ...

class InvalidSignature(FleetError):
    kind: str

class ValidationError(FleetError):
    errors: list[tuple[str, str]]
    paths: list[str]

class PayloadTooLarge(ValidationError): ...

class ManifestError(FleetError):
    kind: str

class ConfigError(FleetError): ...

def sign_v0(secret_text: str, body: bytes) -> str: ...
def compare_digest(a: bytes, b: bytes) -> bool: ...
def validate_heartbeat(body: Union[bytes, bytearray, memoryview, str]) -> dict[str, Any]: ...
def verify_manifest(
    manifest: Union[Mapping[str, Any], str, bytes],
    public_keys: Sequence[str],
    hmac_secret: Union[str, None] = None,
) -> dict[str, Any]: ...

@final
class Signer:
    def __new__(cls, secret_text: str) -> Signer: ...
    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str: ...
    def headers(self, msg_id: str, body: bytes, timestamp: Union[int, None] = None) -> dict[str, str]: ...
    def sign_v0(self, body: bytes) -> str: ...
    def verify(self, body: bytes, headers: _Headers, now: Union[int, None] = None) -> None: ...

@final
class Verifier:
    def __new__(
        cls,
        secrets: Union[Mapping[str, Union[str, Sequence[str]]], str, None] = None,
        fallback: Union[str, None] = None,
        *,
        allow_v0: bool = True,
        tolerance: int = 300,
    ) -> Verifier: ...
    def verify(self, body: bytes, headers: _Headers, now: Union[int, None] = None) -> str: ...

@final
# Logs through `logging`: logger "fleet" and its children (see the docstring).
class Agent:
    def __new__(cls, *, use_env: bool = True, **settings: Union[str, int, float, bool, None]) -> Agent: ...
    @overload
    def add_check(self, name: str, probe: _Probe) -> _Probe: ...
    @overload
    def add_check(self, name: str, probe: None = None) -> Callable[[_Probe], _Probe]: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def running(self) -> bool: ...
    def heartbeat(self) -> dict[str, Any]: ...
    def __enter__(self) -> Agent: ...
    def __exit__(
        self,
        *_args: Union[type[BaseException], BaseException, TracebackType, None],
    ) -> bool: ...
