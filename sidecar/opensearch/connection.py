"""An opensearch-py client from CLI-style options, following opensearch-py's own conventions.

`http_auth=(user, password)`, `verify_certs`, `ca_certs`, `client_cert`, `client_key`, `ssl_show_warn`
map one to one onto `OpenSearch(...)` keyword arguments; credentials may come from the environment
(OPENSEARCH_USERNAME / OPENSEARCH_PASSWORD) so they stay out of shell history.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opensearchpy import OpenSearch

ENV_URL = "OPENSEARCH_URL"
ENV_USERNAME = "OPENSEARCH_USERNAME"
ENV_PASSWORD = "OPENSEARCH_PASSWORD"


@dataclass(frozen=True)
class ConnectionOptions:
    url: str = "http://localhost:9200"
    username: str | None = None
    password: str | None = None
    ca_certs: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    verify_certs: bool = True
    timeout_s: float = 60.0

    @classmethod
    def from_env(cls, url: str | None = None, **kwargs: Any) -> ConnectionOptions:
        """Explicit values win; unset ones fall back to OPENSEARCH_URL / _USERNAME / _PASSWORD."""
        return cls(
            url=url or os.environ.get(ENV_URL) or cls.url,
            username=kwargs.pop("username", None) or os.environ.get(ENV_USERNAME),
            password=kwargs.pop("password", None) or os.environ.get(ENV_PASSWORD),
            **kwargs,
        )

    def client_kwargs(self) -> dict[str, Any]:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"OpenSearch URL must be http(s)://host[:port], got {self.url!r}")
        if bool(self.username) != bool(self.password):
            raise ValueError(
                "give both a username and a password "
                f"(--username/--password or {ENV_USERNAME}/{ENV_PASSWORD})"
            )
        kwargs: dict[str, Any] = {
            "hosts": [self.url],
            "timeout": self.timeout_s,
            # The installer's writes are idempotent, but a retried _register would not be: never retry.
            "max_retries": 0,
            "retry_on_timeout": False,
        }
        if self.username:
            kwargs["http_auth"] = (self.username, self.password)
        if parts.scheme == "https":
            kwargs["use_ssl"] = True
            kwargs["verify_certs"] = self.verify_certs
            kwargs["ssl_show_warn"] = self.verify_certs
            if not self.verify_certs:
                kwargs["ssl_assert_hostname"] = False
            if self.ca_certs:
                kwargs["ca_certs"] = self.ca_certs
            if self.client_cert:
                kwargs["client_cert"] = self.client_cert
            if self.client_key:
                kwargs["client_key"] = self.client_key
        return kwargs

    def connect(self) -> OpenSearch:
        from opensearchpy import OpenSearch

        return OpenSearch(**self.client_kwargs())


def cluster_error_line(
    exc: BaseException, url: str, index: str | None = None, pipeline: str | None = None
) -> str | None:
    """One line (what happened, what to do) for an opensearch-py error a user can fix; None when the error
    is not one of those (the caller lets it through with its traceback)."""
    from opensearchpy.exceptions import ConnectionError as OSConnectionError
    from opensearchpy.exceptions import TransportError

    if isinstance(exc, OSConnectionError):
        return (
            f"cannot reach OpenSearch at {url} ({_cause(exc)}): start a node "
            "(`rerank-sidecar opensearch node start`) or point --url / OPENSEARCH_URL at a running cluster"
        )
    if not isinstance(exc, TransportError):
        return None
    status = exc.status_code if isinstance(exc.status_code, int) else None
    kind, reason = _error_kind(exc)
    if kind == "index_not_found_exception" or (status == 404 and index and "index" in reason.lower()):
        name = index or "the index"
        return (
            f"index {name!r} does not exist on {url}: create it with "
            f"`rerank-sidecar opensearch index --index {name} --corpus DIR` or check --index"
        )
    low = reason.lower()
    if pipeline and "pipeline" in low and ("not defined" in low or "not found" in low or "missing" in low):
        return (
            f"search pipeline {pipeline!r} does not exist on {url} ({reason}): install it with "
            "`rerank-sidecar opensearch install` or check --pipeline"
        )
    if status in (401, 403):
        return (
            f"OpenSearch at {url} refused the request ({status}: {reason}): give credentials with "
            f"--username/--password or {ENV_USERNAME}/{ENV_PASSWORD}"
        )
    if status is not None and 400 <= status < 500:
        return f"OpenSearch at {url} rejected the request ({status} {kind}: {reason})"
    if status is not None and pipeline:
        return (
            f"the search failed in pipeline {pipeline!r} on {url} ({status} {kind}: {reason}): check that "
            "the sidecar runs and that the OpenSearch nodes reach it (`rerank-sidecar opensearch install` "
            "smoke-tests that path)"
        )
    return None


def _cause(exc: BaseException) -> str:
    """The innermost reason of a connection error, e.g. 'Connection refused'."""
    inner: BaseException | None = (
        getattr(exc, "info", None) if isinstance(getattr(exc, "info", None), BaseException) else None
    )
    seen = inner or exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    text = str(seen)
    for known in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if known.lower() in text.lower():
            return known.lower()
    return text.split(":")[-1].strip() or type(seen).__name__


def _error_kind(exc: Any) -> tuple[str, str]:
    """(type, reason) of an OpenSearch error body; the root cause when the top level is generic."""
    info = exc.info if isinstance(exc.info, dict) else {}
    err = info.get("error", exc.error)
    if isinstance(err, dict):
        root = (err.get("root_cause") or [{}])[0] or {}
        kind = str(err.get("type") or root.get("type") or "")
        reason = str(err.get("reason") or root.get("reason") or "")
        return kind, reason
    return str(exc.error or ""), str(err or "")
