"""The evaluator's subcommands (`replay`, `repro`, `dataset`), registered into `rerank-sidecar`.

Registration imports nothing heavy: torch, pyserini and matplotlib load inside the handlers, so
`rerank-sidecar --help` stays instant.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.fusion import FusionSpec

FIRST_STAGES = ("bm25", "dense", "opensearch")
APIS = ("grpc", "http", "opensearch", "none")
# `--fusion` values besides a path to a fusion.json file; "server" sends nothing (the sidecar's default).
FUSION_METHODS = ("server", "none", "rrf", "blend")
EXIT_RERANK_ERRORS = 3


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay",
        help="replay a BEIR collection through first stage + sidecar; report quality and latency",
        description=(
            "Replay every query of a BEIR collection through a first stage (BM25, dense or OpenSearch) and "
            "the sidecar, then report nDCG@10, MRR@10, MAP@100 and recall for both stages side by side, "
            "per-query wins and losses with paired significance tests, latency per stage and throughput. "
            "With no --target "
            "or --http-url, a local sidecar is started for the run."
        ),
    )
    add_replay_arguments(p)
    p.set_defaults(func=replay_command)

    p = subparsers.add_parser(
        "repro",
        help="run the reproduction file's conditions and check their scores (OK / within tolerance / FAIL)",
    )
    p.add_argument(
        "--file", default=None, help="reproduction file (default: repro/beir.toml of this checkout)"
    )
    p.add_argument("--fast", action="store_true", help="only the conditions marked fast (what CI runs)")
    p.add_argument("--condition", action="append", default=[], help="run only this condition (repeatable)")
    p.add_argument("--list", action="store_true", help="list the conditions and their commands, run nothing")
    p.add_argument("--output-root", default="runs/repro", help="where each condition's outputs go")
    p.set_defaults(func=repro_command)

    p = subparsers.add_parser("dataset", help="locate (download if needed) and describe a BEIR dataset")
    _add_dataset_arguments(p)
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    p.set_defaults(func=dataset_command)


def _add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument(
        "--dataset-dir",
        default=None,
        help="a BEIR directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); wins over --dataset",
    )
    g.add_argument(
        "--dataset",
        default=None,
        help="BEIR dataset name (default scifact): a local copy under ../shared/data/beir or the cache is "
        "used, else it is downloaded (checksum-verified) into the cache",
    )
    g.add_argument("--split", default="test", help="qrels split to evaluate (default test)")
    g.add_argument(
        "--cache-dir",
        default=None,
        help="cache for datasets, indexes and embeddings (default $RERANK_CACHE_DIR or "
        "~/.cache/rerank-sidecar)",
    )


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    _add_dataset_arguments(p)
    p.add_argument("--max-queries", type=int, default=None, help="replay only the first N judged queries")

    g = p.add_argument_group("first stage")
    g.add_argument(
        "--first-stage", choices=FIRST_STAGES, default="bm25", help="default bm25 (pyserini/Lucene)"
    )
    g.add_argument("--hits", type=int, default=1000, help="first-stage hits per query (default 1000)")
    g.add_argument("--k1", type=float, default=0.9, help="BM25 k1 (default 0.9, pyserini's BEIR setting)")
    g.add_argument("--b", type=float, default=0.4, help="BM25 b (default 0.4)")
    g.add_argument(
        "--dense-model",
        default=None,
        help="embedding model for --first-stage dense or OpenSearch knn (default: packaged all-MiniLM-L6-v2)",
    )
    g.add_argument("--dense-batch-size", type=int, default=32)
    g.add_argument(
        "--device", default=None, help="device for the dense model (default: sentence-transformers' choice)"
    )
    g.add_argument("--opensearch-url", default=None, help="OpenSearch URL (default $OPENSEARCH_URL)")
    g.add_argument(
        "--opensearch-index", default=None, help="index holding the corpus (default: the dataset name)"
    )
    g.add_argument("--opensearch-query", choices=("match", "knn"), default="match")
    g.add_argument(
        "--opensearch-fields", default="title,text", help="text fields for match (comma-separated)"
    )
    g.add_argument(
        "--opensearch-knn-field", default="embedding", help="knn_vector field for --opensearch-query knn"
    )
    g.add_argument(
        "--opensearch-load",
        action="store_true",
        help="load the corpus into the index first when the index does not exist (the OpenSearch "
        "loader; with --opensearch-query knn the dense model fills the vectors)",
    )

    g = p.add_argument_group("rerank stage")
    g.add_argument(
        "--api",
        choices=APIS,
        default="grpc",
        help="how to reach the reranker: the sidecar over grpc (default) or http, an OpenSearch search "
        "pipeline (--opensearch-pipeline), or none (first stage only)",
    )
    g.add_argument("--depth", type=int, default=100, help="first-stage hits reranked per query (default 100)")
    g.add_argument("--target", default=None, help="gRPC address of a running sidecar (else one is started)")
    g.add_argument(
        "--http-url",
        default=None,
        help="HTTP base URL of a running sidecar (else one is started); with --api opensearch, the sidecar "
        "the pipeline calls, whose /metrics then give its own time per call",
    )
    g.add_argument(
        "--model", default=None, help="model for the locally started sidecar (default: its default)"
    )
    g.add_argument(
        "--serve-args", default="", help="extra `serve` flags for the local sidecar, as one string"
    )
    g.add_argument(
        "--opensearch-pipeline", default=None, help="search pipeline that reranks (with --api opensearch)"
    )
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per rerank call (default 120)")
    g.add_argument(
        "--instruction",
        default=None,
        help="task instruction sent with every rerank request, for instruction-aware models (LLM "
        "rerankers, docs/llm.md); the sidecar refuses it for models that take none",
    )
    g.add_argument(
        "--fusion",
        default="server",
        metavar="{server,none,rrf,blend,FILE}",
        help="score fusion each rerank request asks for: server (default: ask for none, the sidecar's "
        "configured default applies), none, rrf, blend, or a fusion.json file (or a model directory "
        "holding one, as `rerank-sidecar tune-fusion` writes). When a fusion applies, the report also "
        "shows the same replay ranked by the model's score alone",
    )
    g.add_argument(
        "--fusion-alpha",
        type=float,
        default=None,
        help="blend weight of the reranker score, 0 (first-stage order) to 1 (reranker order); default 0.5",
    )
    g.add_argument(
        "--fusion-normalization",
        choices=("minmax", "zscore"),
        default=None,
        help="per-query normalisation of both scores before a blend (default minmax)",
    )
    g.add_argument("--fusion-rrf-k", type=int, default=None, help="rrf constant k (default 60)")

    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=int, default=1, help="queries in flight (closed loop; default 1)")
    g.add_argument(
        "--qps",
        type=float,
        default=None,
        help="offered load in queries/s (open loop; latency counted from each query's due time)",
    )
    g.add_argument("--warmup", type=int, default=5, help="queries run first and discarded (default 5)")

    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="output directory (default runs/<name>)")
    g.add_argument("--name", default=None, help="run name (default <dataset>-<first stage>-<api>-<time>)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--seed", type=int, default=0, help="seed of the randomization test")
    g.add_argument(
        "--max-rerank-errors",
        type=int,
        default=0,
        help=f"exit {EXIT_RERANK_ERRORS} when more rerank calls than this fail (default 0)",
    )


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


def _load_dataset(args: argparse.Namespace, progress: Any) -> Any:
    from sidecar.eval import cache, datasets

    if args.cache_dir:
        cache.use_dir(args.cache_dir)
    task: list[Any] = []

    def on_bytes(done: int, total: int | None) -> None:
        if not task:
            task.append(progress.add_task("downloading dataset", total=total))
        progress.update(task[0], completed=done)

    path, name = datasets.resolve(
        args.dataset_dir, args.dataset, download_ok=not getattr(args, "no_download", False), progress=on_bytes
    )
    return datasets.load(path, split=args.split, name=name)


def _validate(args: argparse.Namespace) -> str | None:
    if args.api == "opensearch" and (args.first_stage != "opensearch" or not args.opensearch_pipeline):
        return "--api opensearch needs --first-stage opensearch and --opensearch-pipeline NAME"
    if args.first_stage == "opensearch" and not (args.opensearch_url or _env("OPENSEARCH_URL")):
        return "--first-stage opensearch needs --opensearch-url (or OPENSEARCH_URL)"
    if args.api != "none" and args.depth > args.hits:
        return (
            f"--depth {args.depth} is more than --hits {args.hits}: "
            "the rerank stage can only see first-stage hits"
        )
    if args.instruction and args.api not in ("grpc", "http"):
        return "--instruction needs --api grpc or http: only the sidecar's own API takes an instruction"
    if args.fusion != "server" and args.api not in ("grpc", "http"):
        return f"--fusion {args.fusion} needs --api grpc or http: only the sidecar's own API takes a fusion"
    return None


def fusion_option(args: argparse.Namespace) -> FusionSpec | None:
    """`--fusion` and its parameters -> the `FusionSpec` every rerank request names, or None for the
    server's default. ValueError says what is wrong."""
    import json

    from sidecar.errors import InvalidInput
    from sidecar.fusion import FUSION_FILE, FusionMethod, FusionSpec

    value = args.fusion
    for flag, given, method in (
        ("--fusion-alpha", args.fusion_alpha, "blend"),
        ("--fusion-normalization", args.fusion_normalization, "blend"),
        ("--fusion-rrf-k", args.fusion_rrf_k, "rrf"),
    ):
        if given is not None and value != method:
            raise ValueError(f"{flag} applies to --fusion {method} only (got --fusion {value})")
    if value == "server":
        return None
    try:
        if value in FUSION_METHODS:
            params = {
                "alpha": args.fusion_alpha,
                "normalization": args.fusion_normalization,
                "rrf_k": args.fusion_rrf_k,
            }
            return FusionSpec(FusionMethod(value), **{k: v for k, v in params.items() if v is not None})
        path = Path(value).expanduser()
        if path.is_dir():
            path = path / FUSION_FILE
        if not path.is_file():
            raise ValueError(
                f"--fusion {value!r} is neither a method ({', '.join(FUSION_METHODS)}) nor a {FUSION_FILE} "
                "file or a directory holding one"
            )
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--fusion {path} is not readable JSON ({exc})") from None
        # Not strict: fusion.json carries where and how it was chosen besides the spec.
        return FusionSpec.from_dict(obj, where=str(path), strict=False)
    except InvalidInput as exc:  # InvalidSchema included
        raise ValueError(f"--fusion {value}: {exc.message}") from None


def _env(name: str) -> str | None:
    import os

    return os.environ.get(name)


def _build_first_stage(args: argparse.Namespace, dataset: Any, progress: Any) -> Any:
    if args.first_stage == "bm25":
        from sidecar.eval.bm25 import LuceneBm25

        return LuceneBm25(dataset, k1=args.k1, b=args.b, progress=progress)
    if args.first_stage == "dense":
        from sidecar.eval.dense import DenseExact

        return DenseExact(
            dataset,
            model=args.dense_model,
            batch_size=args.dense_batch_size,
            device=args.device,
            progress=progress,
        )
    from sidecar.eval.opensearch_stage import OpenSearchFirstStage

    encoder = None
    if args.opensearch_query == "knn":
        from sentence_transformers import SentenceTransformer

        from sidecar.eval.dense import packaged_model_dir

        model = SentenceTransformer(str(args.dense_model or packaged_model_dir()), device=args.device)

        def encoder(q: str) -> Any:
            return model.encode([q], normalize_embeddings=True, show_progress_bar=False)[0]

    url = args.opensearch_url or _env("OPENSEARCH_URL") or ""
    index = args.opensearch_index or dataset.name
    if args.opensearch_load:
        _load_opensearch(args, dataset, url, index, progress)
    return OpenSearchFirstStage(
        url,
        index,
        mode=args.opensearch_query,
        fields=[f for f in args.opensearch_fields.split(",") if f],
        knn_field=args.opensearch_knn_field,
        query_encoder=encoder,
    )


def _load_opensearch(args: argparse.Namespace, dataset: Any, url: str, index: str, progress: Any) -> None:
    from sidecar.eval.opensearch_stage import connect
    from sidecar.opensearch.indexer import BeirDoc, index_beir_corpus, sentence_transformer_embedder

    client = connect(url)
    try:
        if client.indices.exists(index=index):
            return
        embed, dim = (None, None)
        if args.opensearch_query == "knn":
            embed, dim = sentence_transformer_embedder(args.dense_model)
        task = progress.add_task(
            f"loading {dataset.name} into OpenSearch index {index}", total=len(dataset.corpus)
        )
        docs = (BeirDoc(d, doc.title, doc.text) for d, doc in dataset.corpus.items())

        def counted() -> Any:
            for doc in docs:
                progress.advance(task)
                yield doc

        index_beir_corpus(
            client, index, counted(), knn_dim=dim, embed=embed, knn_field=args.opensearch_knn_field
        )
    finally:
        client.close()


def _build_reranker(
    args: argparse.Namespace,
    first_stage: Any,
    out_dir: Path,
    stack: ExitStack,
    progress: Any,
    fusion: FusionSpec | None = None,
) -> tuple[Any, str | None]:
    """The reranker, and a gRPC address to ask for the model's Info (None when there is no sidecar).

    `fusion` (a `FusionSpec`, None for the server's default) is named in every sidecar request."""
    if args.api == "none" or args.depth == 0:
        return None, None
    if args.api == "opensearch":
        from sidecar.eval.opensearch_stage import OpenSearchPipelineReranker

        return OpenSearchPipelineReranker(first_stage, args.opensearch_pipeline, args.http_url), args.target
    from sidecar.eval.rerankers import GrpcReranker, HttpReranker

    target, http_url = args.target, args.http_url
    local = (args.api == "grpc" and not target) or (args.api == "http" and not http_url)
    if local:
        from sidecar.launch import SidecarProcess

        serve = (["--model", args.model] if args.model else []) + shlex.split(args.serve_args)
        if not any(a.startswith("--embedding-cache-dir") for a in serve):
            # Document embeddings persist in the evaluator's cache, keyed by the model's content hash: a
            # second replay of the same corpus embeds nothing again (cross-encoders ignore the flag).
            from sidecar.eval.cache import cache_dir

            serve += ["--embedding-cache-dir", str(cache_dir() / "embeddings")]
        log = out_dir / "sidecar.log"
        progress.console.print(
            f"starting a local sidecar ({' '.join(serve) or 'its default model'}); log: {log}", soft_wrap=True
        )
        task = progress.add_task("starting local sidecar", total=1)
        sc = stack.enter_context(SidecarProcess(serve, log_path=log))
        progress.update(task, completed=1)
        target, http_url = sc.grpc_target, sc.http_url
    if args.api == "grpc":
        grpc_reranker = GrpcReranker(
            target, timeout=args.timeout, fusion=fusion, instruction=args.instruction
        )
        stack.callback(grpc_reranker.close)
        if not local:
            grpc_reranker.wait_ready(timeout=60.0)
        return grpc_reranker, target
    http_reranker = HttpReranker(http_url, timeout=args.timeout, fusion=fusion, instruction=args.instruction)
    stack.callback(http_reranker.close)
    return http_reranker, target


def _describe_reranker(reranker: Any, info_target: str | None) -> dict[str, Any] | None:
    if reranker is None:
        return None
    d: dict[str, Any] = reranker.describe()
    if "model_id" not in d and info_target:
        # HTTP has no Info call; the sidecar's gRPC address, when known, still tells which model answered.
        from sidecar.eval.rerankers import GrpcReranker

        probe = GrpcReranker(info_target)
        try:
            d.update({k: v for k, v in probe.describe().items() if k not in ("api", "target")})
        finally:
            probe.close()
    return d


def _output_dir(args: argparse.Namespace, dataset_name: str) -> Path:
    if args.output:
        return Path(args.output)
    api = "none" if args.api == "none" or args.depth == 0 else args.api
    name = args.name or f"{dataset_name}-{args.first_stage}-{api}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path("runs") / name


def _command_line() -> list[str]:
    """The command as a user would retype it (best effort: argv of whichever entry point ran us)."""
    if sys.argv[1:2] == ["replay"]:
        return ["rerank-sidecar", *sys.argv[1:]]
    return list(sys.argv)


def replay_command(args: argparse.Namespace) -> int:
    from sidecar.progress import progress_display

    problem = _validate(args)
    if problem:
        print(f"replay: {problem}", file=sys.stderr)
        return 2
    try:
        fusion = fusion_option(args)
    except ValueError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    from sidecar.eval import report
    from sidecar.eval.datasets import DatasetError
    from sidecar.eval.replay import ReplayConfig, replay

    err = _console(stderr=True)
    try:
        config = ReplayConfig(
            hits=args.hits, depth=args.depth, concurrency=args.concurrency, qps=args.qps, warmup=args.warmup
        )
    except ValueError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        progress = stack.enter_context(progress_display(err))
        try:
            dataset = _load_dataset(args, progress)
        except DatasetError as exc:
            progress.stop()
            print(f"replay: {exc}", file=sys.stderr)
            return 2
        for warning in dataset.warnings:
            err.print(f"[yellow]{dataset.name}: {warning}[/]")
        qids = dataset.query_ids(args.max_queries)
        out_dir = _output_dir(args, dataset.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            first_stage = _build_first_stage(args, dataset, progress)
            stack.callback(first_stage.close)
            reranker, info_target = _build_reranker(args, first_stage, out_dir, stack, progress, fusion)
        except (ValueError, RuntimeError, TimeoutError, ConnectionError) as exc:
            progress.stop()
            print(f"replay: {exc}", file=sys.stderr)
            return 2
        result = replay(dataset, qids, first_stage, reranker, config, progress)
        progress.stop()
        summary = report.build_result(
            dataset,
            result,
            first_stage=first_stage.describe(),
            rerank=_describe_reranker(reranker, info_target),
            command=_command_line(),
            seed=args.seed,
        )
        summary["arguments"] = {k: v for k, v in vars(args).items() if k != "func"}
        report.write_outputs(out_dir, dataset, result, summary, plots=not args.no_plots)
    report.print_summary(summary, _console())
    print(f"outputs: {out_dir}/ ({', '.join(summary['files'].values())})")
    errors = summary.get("errors", {}).get("rerank_errors", 0)
    if errors > args.max_rerank_errors:
        print(f"replay: {errors} rerank calls failed (allowed {args.max_rerank_errors})", file=sys.stderr)
        return EXIT_RERANK_ERRORS
    return 0


def repro_command(args: argparse.Namespace) -> int:
    from sidecar.eval import repro

    try:
        conditions = repro.load(repro.find_file(args.file))
    except repro.ReproError as exc:
        print(f"repro: {exc}", file=sys.stderr)
        return 2
    selected = repro.select(conditions, fast=args.fast, names=args.condition)
    if not selected:
        print("repro: no condition matches", file=sys.stderr)
        return 2
    if args.list:
        for c in selected:
            print(f"{c.name}{' (fast)' if c.fast else ''}: {c.command}")
        return 0
    outcomes = repro.run_all(selected, Path(args.output_root), console=_console())
    return 0 if all(o.passed for o in outcomes) else 1


def dataset_command(args: argparse.Namespace) -> int:
    from sidecar.eval.datasets import DatasetError
    from sidecar.progress import progress_display

    err = _console(stderr=True)
    with progress_display(err) as progress:
        try:
            dataset = _load_dataset(args, progress)
        except DatasetError as exc:
            progress.stop()
            print(f"dataset: {exc}", file=sys.stderr)
            return 2
    splits = sorted(p.stem for p in (dataset.path / "qrels").glob("*.tsv"))
    judgments = sum(len(v) for v in dataset.qrels.values())
    print(f"{dataset.name}: {dataset.path}")
    print(f"  documents {len(dataset.corpus)}, queries {len(dataset.queries)}, splits {', '.join(splits)}")
    print(f"  {dataset.split}: {len(dataset.query_ids())} judged queries, {judgments} judgments")
    for warning in dataset.warnings:
        print(f"  warning: {warning}")
    return 0
