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
