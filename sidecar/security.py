"""Transport security, both sides: the server's TLS material, the one bearer-token comparison and the
warning for an exposed plain-text server; the client's channel (CA, client certificate, token).

The front ends call `bearer_ok` (gRPC interceptor, HTTP middleware); nothing else compares tokens.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from sidecar.settings import Settings, flag_name

AUTHORIZATION = "authorization"


class SecurityError(Exception):
    """TLS material that cannot be used; the message names the setting and says what to fix."""


# ---- server side ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerTls:
    cert_file: str
    key_file: str
    client_ca_file: str | None
    # Built (and so checked) before any port opens: grpc's own errors for a bad PEM are C++ log lines.
    ssl_context: ssl.SSLContext

    def grpc_credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.client_ca_file, "tls_client_ca_file") if self.client_ca_file else None
        pair = (_read(self.key_file, "tls_key_file"), _read(self.cert_file, "tls_cert_file"))
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def server_tls(settings: Settings) -> ServerTls | None:
    """The server's TLS from settings (None without --tls-cert-file); SecurityError for unusable files."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    cert, key, ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    for path, field in ((cert, "tls_cert_file"), (key, "tls_key_file"), (ca, "tls_client_ca_file")):
        if path is not None:
            _read(path, field)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise SecurityError(
            f"{flag_name('tls_cert_file')} {cert} / {flag_name('tls_key_file')} {key} cannot be used "
            f"({exc.reason or exc}): give a PEM certificate and the PEM private key that belongs to it"
        ) from exc
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise SecurityError(
                f"{flag_name('tls_client_ca_file')} {ca} is not a PEM CA bundle ({exc.reason or exc})"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return ServerTls(cert, key, ca, context)


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read {flag_name(field)} {path}: {exc.strerror or exc}") from exc


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an Authorization value is `Bearer <token>`; the token is compared in constant time."""
    if header is None:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    same = hmac.compare_digest(credentials.strip().encode("utf-8"), token.encode("utf-8"))
    return same and scheme.lower() == "bearer"


def is_loopback(host: str) -> bool:
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warnings(settings: Settings) -> list[str]:
    """What is unprotected about a server reachable beyond this machine (nothing on loopback)."""
    if is_loopback(settings.host):
        return []
    where = f"{settings.host} (not loopback)"
    warnings = []
    if not settings.tls:
        warnings.append(
            f"SECURITY: listening on {where} without TLS: queries, documents and any token cross the "
            f"network in clear text; set {flag_name('tls_cert_file')} and {flag_name('tls_key_file')}"
        )
    if settings.auth_token is None and settings.tls_client_ca_file is None:
        warnings.append(
            f"SECURITY: listening on {where} without authentication: anyone who can reach the ports can "
            f"use the reranker; set RERANK_AUTH_TOKEN or {flag_name('tls_client_ca_file')}"
        )
    return warnings


# ---- client side ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a sidecar that uses TLS, mutual TLS or a token. The default is plain text."""

    tls: bool = False
    ca_file: str | None = None  # None with TLS: the system's trusted roots
    cert_file: str | None = None  # client certificate, for a server that requires one (mutual TLS)
    key_file: str | None = None
    token: str | None = None

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """For HTTP clients (None: plain HTTP)."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def http_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


PLAIN = ClientSecurity()


def grpc_channel(
    target: str, security: ClientSecurity | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A channel to `target`, over TLS when `security` says so, sending its token with every call."""
    security = security or PLAIN
    if not security.uses_tls:
        channel = grpc.insecure_channel(target, options=list(options))
    else:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(security.ca_file),
            private_key=read(security.key_file),
            certificate_chain=read(security.cert_file),
        )
        channel = grpc.secure_channel(target, credentials, options=list(options))
    if security.token:
        # Metadata rather than call credentials: grpc sends those only over TLS, and a loopback
        # sidecar may check a token without TLS.
        channel = grpc.intercept_channel(channel, _BearerInterceptor(security.token))
    return channel


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)
