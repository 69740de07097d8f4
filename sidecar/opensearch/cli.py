"""`rerank-sidecar opensearch ...`: install / uninstall the integration, render its bodies, index a BEIR
corpus, and search through a pipeline. opensearch-py is imported inside the handlers, so --help is instant.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_SIDECAR_URL = "http://127.0.0.1:8080"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _add_connection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("OpenSearch connection (opensearch-py conventions)")
    g.add_argument(
        "--url",
        default=_env("OPENSEARCH_URL", "http://localhost:9200"),
        help="cluster URL (env OPENSEARCH_URL; default %(default)s)",
    )
    g.add_argument(
        "--username", default=_env("OPENSEARCH_USERNAME"), help="basic auth user (env OPENSEARCH_USERNAME)"
    )
    g.add_argument(
        "--password",
        default=_env("OPENSEARCH_PASSWORD"),
        help="basic auth password (env OPENSEARCH_PASSWORD; prefer the env var)",
    )
    g.add_argument(
        "--ca-certs",
        default=_env("OPENSEARCH_CA_CERTS"),
        help="CA bundle for https (env OPENSEARCH_CA_CERTS)",
    )
    g.add_argument("--client-cert", default=None, help="client certificate for mutual TLS")
    g.add_argument("--client-key", default=None, help="client key for mutual TLS")
    g.add_argument(
        "--no-verify-certs",
        dest="verify_certs",
        action="store_false",
        help="do not verify the cluster's TLS certificate (test clusters only)",
    )
    g.add_argument(
        "--timeout", type=float, default=60.0, help="request timeout in seconds (default %(default)s)"
    )
    g.add_argument(
        "--log-level",
        default=_env("RERANK_LOG_LEVEL", "INFO"),
        help="DEBUG shows tracebacks and every HTTP call (env RERANK_LOG_LEVEL; default %(default)s)",
    )


def _add_plugin_config(p: argparse.ArgumentParser, with_version: bool = False) -> None:
    g = p.add_argument_group("integration")
    g.add_argument(
        "--sidecar-url",
        default=_env("RERANK_SIDECAR_URL", DEFAULT_SIDECAR_URL),
        help="the sidecar's HTTP URL as the OpenSearch nodes reach it (env RERANK_SIDECAR_URL; "
        "default %(default)s)",
    )
    g.add_argument(
        "--fields",
        default="title,text",
        help="comma-separated document fields the reranker reads (default %(default)s)",
    )
    g.add_argument(
        "--name",
        default="rerank-sidecar",
        help="name of the connector, model, model group and pipelines (default %(default)s)",
    )
    g.add_argument(
        "--paths",
        default="rerank,by_field",
        help="which pipelines: rerank (rerank processor) and/or by_field (ml_inference + "
        "rerank.by_field); default %(default)s",
    )
    g.add_argument(
        "--connection-timeout", type=int, default=2, help="connector connect timeout, whole seconds"
    )
    g.add_argument("--read-timeout", type=int, default=5, help="connector read timeout, whole seconds")
    g.add_argument("--max-connection", type=int, default=32, help="connector connection pool size")
    g.add_argument("--max-retry-times", type=int, default=0, help="ml-commons retries on 429/5xx (default 0)")
    g.add_argument(
        "--post-process",
        choices=("default", "cohere"),
        default="default",
        help="built-in rerank post-process function of the rerank path (default %(default)s)",
    )
    g.add_argument(
        "--sample-factor",
        type=float,
        default=1.0,
        help="rerank a window this many times the page size (oversample + truncate_hits); 1 = off",
    )
    g.add_argument(
        "--ignore-failure",
        action="store_true",
        help="on reranker failure return first-stage order instead of failing the search "
        "(nothing in the response marks it)",
    )
    g.add_argument(
        "--scores-field",
        default=None,
        help="the one field the by_field path sends (default: last of --fields)",
    )
    g.add_argument(
        "--previous-score-field", default=None, help="by_field previous-score field name (OpenSearch 3.8+)"
    )
    if with_version:
        g.add_argument("--opensearch-version", default="3.0.0", help="target version (default %(default)s)")


def _plugin_config(args: argparse.Namespace, version: str = "3.0.0") -> Any:
    from sidecar.opensearch.templates import PluginConfig

    return PluginConfig(
        sidecar_url=args.sidecar_url,
        fields=tuple(f.strip() for f in args.fields.split(",") if f.strip()),
        opensearch_version=getattr(args, "opensearch_version", None) or version,
        name=args.name,
        connection_timeout_s=args.connection_timeout,
        read_timeout_s=args.read_timeout,
        max_connection=args.max_connection,
        max_retry_times=args.max_retry_times,
        post_process=args.post_process,
        sample_factor=args.sample_factor,
        ignore_failure=args.ignore_failure,
        scores_field=args.scores_field,
        previous_score_field=args.previous_score_field,
    )


def _kinds(args: argparse.Namespace) -> tuple[Any, ...]:
    from sidecar.opensearch.templates import KINDS

    kinds = tuple(k.strip().replace("-", "_") for k in args.paths.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--paths takes rerank and/or by_field, got {args.paths!r}")
    return kinds


def _client(args: argparse.Namespace) -> Any:
    from sidecar.opensearch.connection import ConnectionOptions

    return ConnectionOptions(
        url=args.url,
        username=args.username,
        password=args.password,
        ca_certs=args.ca_certs,
        client_cert=args.client_cert,
        client_key=args.client_key,
        verify_certs=args.verify_certs,
        timeout_s=args.timeout,
    ).connect()


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a handler that talks to a cluster; an error the user can fix (cluster down, no such index or
    pipeline, refused credentials) becomes one line and exit 2. --log-level DEBUG keeps the traceback."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        import logging

        from sidecar.opensearch.connection import cluster_error_line

        debug = str(getattr(args, "log_level", "INFO")).upper() == "DEBUG"
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
        if not debug:
            # opensearch-py logs every failed call at WARNING with its traceback; the one line says it all.
            logging.getLogger("opensearch").setLevel(logging.CRITICAL)
        try:
            return handler(args)
        except Exception as exc:
            line = cluster_error_line(
                exc, args.url, index=getattr(args, "index", None), pipeline=getattr(args, "pipeline", None)
            )
            if line is None or debug:
                raise
            return _fail(line)

    return run


# ---- handlers ---------------------------------------------------------------------------------
def _install(args: argparse.Namespace) -> int:
    from sidecar.opensearch import templates as T
    from sidecar.opensearch.installer import Installer, InstallError

    try:
        cfg = _plugin_config(args)
        kinds = _kinds(args)
        installer = Installer(_client(args), cfg)
        report = installer.install(
            kinds,
            index=args.index,
            default_pipeline=args.default_pipeline,
            smoke=args.smoke_test,
            settings=not args.skip_settings,
            private_ip=args.private_ip,
        )
    except (InstallError, ValueError) as exc:
        return _fail(str(exc))
    _print_report(report, args.url)
    cfg = installer.cfg
    index = args.index or "<index>"
    for kind in kinds:
        body = T.search_body(cfg, kind, "your query", size=10)
        print(
            f"\nsearch through {report.pipelines[kind]}:\n  POST /{index}/_search?search_pipeline="
            f"{report.pipelines[kind]}\n  {json.dumps(body)}"
        )
    return 0


def _print_report(report: Any, url: str) -> None:
    print(f"OpenSearch {report.version} at {url}")
    for step in report.steps:
        print(f"  {step}")
    for note in report.notes:
        print(f"  note: {note}")


def _uninstall(args: argparse.Namespace) -> int:
    from sidecar.opensearch.installer import Installer, InstallError

    try:
        report = Installer(_client(args), _plugin_config(args)).uninstall(
            _kinds(args), settings=not args.skip_settings
        )
    except (InstallError, ValueError) as exc:
        return _fail(str(exc))
    _print_report(report, args.url)
    return 0


def _render(args: argparse.Namespace) -> int:
    from sidecar.opensearch.templates import UnsupportedVersion, render_all

    try:
        requests = render_all(_plugin_config(args), _kinds(args), index=args.index or "docs")
    except (UnsupportedVersion, ValueError) as exc:
        return _fail(str(exc))
    if args.out:
        write_rendered(Path(args.out), requests)
        print(f"wrote {len(requests)} files to {args.out}")
        return 0
    for r in requests:
        print(f"# {r.filename}" + (f"  ({r.note})" if r.note else ""))
        print(f"{r.method} {r.path}")
        print(json.dumps(r.body, indent=2))
        print()
    return 0


def write_rendered(out: Path, requests: list[Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for r in requests:
        doc = {"method": r.method, "path": r.path, "body": r.body}
        if r.note:
            doc["note"] = r.note
        (out / r.filename).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _index(args: argparse.Namespace) -> int:
    from sidecar.opensearch.indexer import index_beir_corpus, sentence_transformer_embedder

    embed, dim = None, None
    if args.knn or args.embed_model:
        embed, dim = sentence_transformer_embedder(args.embed_model)
    try:
        n = index_beir_corpus(
            _client(args),
            args.index,
            args.corpus,
            knn_dim=dim,
            embed=embed,
            knn_field=args.knn_field,
            recreate=args.recreate,
            limit=args.limit,
            batch_size=args.batch_size,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return _fail(str(exc))
    print(
        f"indexed {n} documents into {args.index}"
        + (f" (knn_vector {args.knn_field}, dim {dim})" if dim else "")
    )
    return 0


def _search(args: argparse.Namespace) -> int:
    from sidecar.opensearch import templates as T

    cfg = _plugin_config(args)
    kind: T.Kind = "rerank" if args.pipeline == cfg.name else "by_field"
    body = T.search_body(cfg, kind, args.query, size=args.size)
    params = {"search_pipeline": args.pipeline} if args.pipeline else {}
    if not args.pipeline:
        body.pop("ext", None)
    got = _client(args).search(index=args.index, body=body, params=params)
    for rank, hit in enumerate(got["hits"]["hits"], 1):
        src = hit.get("_source", {})
        prev = src.get("previous_score")
        extra = f"  (first stage {prev:.4f})" if isinstance(prev, int | float) else ""
        text = " ".join(str(src.get(f, "")) for f in cfg.fields)[:100]
        print(f"{rank:3d}. {hit['_score']:+.4f}{extra}  {hit['_id']}  {text}")
    return 0


def _node(args: argparse.Namespace) -> int:
    from sidecar.opensearch import node

    home = Path(args.home).expanduser() if args.home else None
    try:
        if args.node_command == "start":
            t = node.start(args.version, args.port, args.heap, home, args.timeout, log=_log_line)
            if "start_s" in t:
                print(
                    f"download {t['download_s']} s, assemble {t['assemble_s']} s, start {t['start_s']} s; "
                    f"node in {t['home']}; stop it with `rerank-sidecar opensearch node stop`"
                )
            return 0
        if args.node_command == "stop":
            node.stop(args.version, home, log=_log_line, port=args.port)
            return 0
        got = node.health(args.port)
        if got is None:
            print(f"no OpenSearch answers on 127.0.0.1:{args.port}")
            return 1
        print(f"OpenSearch on 127.0.0.1:{args.port}: {got.get('status')} ({got.get('number_of_nodes')} node)")
        return 0
    except node.NodeError as exc:
        return _fail(str(exc))


def _log_line(text: str) -> None:
    print(text, flush=True)


def register(subparsers: Any) -> None:
    """Add `opensearch` with its sub-commands to the top-level CLI."""
    top = subparsers.add_parser(
        "opensearch",
        help="OpenSearch integration: install the pipelines, index a BEIR corpus",
        description="Wire the sidecar into OpenSearch through ml-commons connectors and search pipelines.",
    )
    sub = top.add_subparsers(dest="opensearch_command", required=True)

    p = sub.add_parser("install", help="settings, connector, model, smoke test and pipelines (idempotent)")
    _add_connection(p)
    _add_plugin_config(p)
    p.add_argument(
        "--index", default=None, help="index to check the fields against (and set a default pipeline on)"
    )
    p.add_argument(
        "--default-pipeline",
        choices=("rerank", "by_field"),
        default=None,
        help="also make this pipeline the index's index.search.default_pipeline",
    )
    ip = p.add_mutually_exclusive_group()
    ip.add_argument(
        "--private-ip",
        dest="private_ip",
        action="store_true",
        default=None,
        help="set plugins.ml_commons.connector.private_ip_enabled (default: when the URL is private)",
    )
    ip.add_argument("--no-private-ip", dest="private_ip", action="store_false")
    p.add_argument("--skip-settings", action="store_true", help="leave cluster settings alone")
    p.add_argument(
        "--no-smoke-test",
        dest="smoke_test",
        action="store_false",
        help="skip the _predict call that proves OpenSearch reaches the sidecar",
    )
    p.set_defaults(func=_guarded(_install))

    p = sub.add_parser("uninstall", help="remove the pipelines, models, connectors and the endpoint setting")
    _add_connection(p)
    _add_plugin_config(p)
    p.add_argument("--skip-settings", action="store_true", help="leave cluster settings alone")
    p.set_defaults(func=_guarded(_uninstall))

    p = sub.add_parser("render", help="print (or write) every request body install would send")
    _add_plugin_config(p, with_version=True)
    p.add_argument("--index", default=None, help="index name for the example searches")
    p.add_argument("--out", default=None, help="write one JSON file per request into this directory")
    p.set_defaults(func=_render)

    p = sub.add_parser("index", help="bulk-load a BEIR corpus (BM25 text fields, optional knn_vector)")
    _add_connection(p)
    p.add_argument("--index", required=True, help="index name")
    p.add_argument("--corpus", required=True, help="BEIR dataset directory or its corpus.jsonl")
    p.add_argument("--limit", type=int, default=None, help="index only the first N documents")
    p.add_argument("--recreate", action="store_true", help="drop the index first")
    p.add_argument("--knn", action="store_true", help="add a knn_vector field embedded with all-MiniLM-L6-v2")
    p.add_argument(
        "--embed-model", default=None, help="sentence-transformers model for --knn (local directory)"
    )
    p.add_argument("--knn-field", default="embedding", help="knn_vector field name (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=500, help="documents per bulk request")
    p.set_defaults(func=_guarded(_index))

    p = sub.add_parser("search", help="BM25 search, optionally through a pipeline, and print the hits")
    _add_connection(p)
    _add_plugin_config(p)
    p.add_argument("--index", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--pipeline", default=None, help="search pipeline name (omit for plain BM25)")
    p.add_argument("--size", type=int, default=10)
    p.set_defaults(func=_guarded(_search))

    from sidecar.opensearch.node import DEFAULT_HEAP, DEFAULT_PORT, DEFAULT_VERSION, RELEASES

    p = sub.add_parser(
        "node",
        help="start / stop a local OpenSearch with ml-commons, k-NN and neural-search (needs Java and Maven)",
        description="A single-node OpenSearch on 127.0.0.1, security off, built from published Maven "
        "artifacts cached in ~/.cache/rerank-sidecar/opensearch (RERANK_CACHE_DIR moves it).",
    )
    p.add_argument("node_command", choices=("start", "stop", "status"))
    p.add_argument("--version", default=DEFAULT_VERSION, choices=sorted(RELEASES), help="default %(default)s")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    p.add_argument("--heap", default=DEFAULT_HEAP, help="JVM heap, -Xms and -Xmx (default %(default)s)")
    p.add_argument("--home", default=None, help="where the node is assembled and keeps its data")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for green (default %(default)s)"
    )
    p.set_defaults(func=_node)
