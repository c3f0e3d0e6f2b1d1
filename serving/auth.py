"""API keys: who is calling. Keys map to principals; records store the principal, never the key."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import tomllib
from pathlib import Path

from serving.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

OPEN_PRINCIPAL = "anonymous"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The key -> principal table. With no keys the service is open (local use only)."""

    def __init__(self, keys: dict[str, str]) -> None:
        # Keep digests only: a memory dump or a debug print shows no usable key.
        self._principals = {_digest(key): principal for key, principal in keys.items()}

    @property
    def open(self) -> bool:
        return not self._principals

    @classmethod
    def load(
        cls, keys_file: Path | None, env_value: str | None = None, *, table: str = "keys", env: str = "HEED_API_KEYS"
    ) -> ApiKeys:
        """Keys from ``[keys]`` of a TOML file (principal = "key") and from ``principal:key,...``.
        Admin keys come from another table and variable (``[admin_keys]``, ``HEED_ADMIN_KEYS``)."""
        keys: dict[str, str] = {}
        if keys_file is not None:
            with open(keys_file, "rb") as fh:
                entries = tomllib.load(fh).get(table, {})
            for principal, key in entries.items():
                keys[str(key)] = str(principal)
        env_value = os.environ.get(env) if env_value is None else env_value
        for item in filter(None, (part.strip() for part in (env_value or "").split(","))):
            principal, sep, key = item.partition(":")
            if not sep or not principal or not key:
                raise ValueError(f"{env} must look like 'principal:key,principal:key'")
            keys[key] = principal
        return cls(keys)

    def overlaps(self, other: ApiKeys) -> bool:
        """Whether a key of one table is also a key of the other (admin keys must be distinct)."""
        return bool(set(self._principals) & set(other._principals))

    def principal_for(self, authorization: str | None) -> str:
        """The principal named by an ``Authorization: Bearer KEY`` value; raises Unauthenticated."""
        if self.open:
            return OPEN_PRINCIPAL
        if not authorization:
            raise Unauthenticated(
                "You didn't provide an API key: send 'Authorization: Bearer KEY'", code="missing_api_key"
            )
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("The Authorization header must be 'Bearer KEY'", code="invalid_api_key")
        digest = _digest(key.strip())
        for known, principal in self._principals.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise Unauthenticated("Incorrect API key provided", code="invalid_api_key")


def admin_principal(admin_keys: ApiKeys, api_keys: ApiKeys, authorization: str | None) -> str:
    """The admin named by an ``Authorization: Bearer ADMIN_KEY``. With no admin key the admin API
    is off, open service or not: a rollout is never steered by whoever can reach the port."""
    if admin_keys.open:
        raise PermissionDenied(
            "the admin API is disabled: no admin key is configured (HEED_ADMIN_KEYS or --admin-keys-file)",
            code="admin_disabled",
        )
    return admin_keys.principal_for(authorization)


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, without port) is this machine only."""
    import ipaddress

    if host.lower() in LOOPBACK_HOSTS or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_of(value: str) -> str:
    """The host of a Host header or of an Origin (scheme, host and port), without the port."""
    rest = value.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):  # [::1]:8000
        return rest[: rest.find("]") + 1]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest
