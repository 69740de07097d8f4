"""Reranking sidecar for search engines."""

__version__ = "0.1.0"
