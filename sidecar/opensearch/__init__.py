"""OpenSearch integration: ml-commons wire facts, plugin-config templates, the installer and the BEIR indexer.

Nothing here imports opensearch-py at module import time, so `rerank-sidecar --help` stays instant.
"""
