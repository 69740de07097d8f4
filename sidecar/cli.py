"""`rerank-sidecar` command line. Imports stay lazy so `--help` is instant (no torch at start-up).

`serve` flags are generated from the Settings fields, so every flag has an env twin and one description.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    from sidecar.settings import Settings, env_name, flag_name

    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        default = field.default
        help_text = f"{field.description} [env {env_name(name)}; default {default!r}]"
        kwargs: dict[str, typing.Any] = {"dest": name, "default": None, "help": help_text}
        args = typing.get_args(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(args)
        elif annotation is int or int in args:
            kwargs["type"] = int
        elif annotation is float or float in args:
            kwargs["type"] = float
        parser.add_argument(flag_name(name), **kwargs)


def settings_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from sidecar.settings import Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for error in exc.errors():  # one line each: the setting and what is wrong with it
            where = ".".join(str(x) for x in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            print(f"invalid setting{' ' + where if where else ''}: {message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sidecar.server import main

    main(settings)


# `health` exit codes: probes and scripts tell "wait" (NOT_SERVING) from "start one" (nothing answering).
EXIT_NOT_SERVING = 1
EXIT_UNREACHABLE = 3


class UserError(Exception):
    """An ordinary mistake (no server, wrong address): `main` prints the message as one line, no traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _no_server(target: str) -> str:
    return (
        f"no sidecar is answering at {target}: start one with `rerank-sidecar serve`, "
        "or point --target at a running one"
    )


def _rpc_error(target: str, exc: Exception) -> UserError:
    import grpc

    call = exc if isinstance(exc, grpc.Call) else None
    code = call.code() if call else None
    details = (call.details() if call else str(exc)) or ""
    if code == grpc.StatusCode.UNAVAILABLE and _tls_failure(details):
        return UserError(_tls_hint(target, details), EXIT_UNREACHABLE)
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        return UserError(_no_server(target), EXIT_UNREACHABLE)
    name = code.name if code else type(exc).__name__
    return UserError(f"the sidecar at {target} answered {name}: {details}")


def _tls_failure(details: str) -> bool:
    # "Socket closed": something accepted the connection and hung up, as a TLS server does on a
    # plain-text client and a mutual-TLS server on a client without a certificate ("refused" is no server).
    lowered = details.lower()
    return any(word in lowered for word in ("ssl", "tls", "handshake", "certificate", "socket closed"))


def _tls_hint(target: str, details: str) -> str:
    return (
        f"the TLS handshake with {target} failed ({details.strip()}): a TLS sidecar needs --ca-file with "
        "the CA that signed its certificate (or --tls for the system's roots), and --client-cert / "
        "--client-key when it requires client certificates; a plain-text one needs none of them"
    )


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from sidecar.client import RerankerClient
    from sidecar.security import ClientSecurity

    if (args.client_cert is None) != (args.client_key is None):
        raise UserError("--client-cert and --client-key go together: give both, or neither", 2)
    security = ClientSecurity(
        tls=args.tls,
        ca_file=args.ca_file,
        cert_file=args.client_cert,
        key_file=args.client_key,
        token=args.token,
    )
    try:
        return RerankerClient(args.target, security)
    except OSError as exc:  # an unreadable --ca-file / --client-cert / --client-key
        raise UserError(f"cannot read {exc.filename}: {exc.strerror}", 2) from None


def _health(args: argparse.Namespace) -> int:
    from sidecar.health import PROBE_NOT_SERVING, PROBE_SERVING, probe

    with _client(args) as client:
        answer, detail = probe(client.channel, args.service, timeout=args.timeout)
    if answer == PROBE_SERVING:
        print("SERVING")
        return 0
    if answer == PROBE_NOT_SERVING:
        print(f"NOT_SERVING: the sidecar at {args.target} is up but not taking work (loading, warming up "
              f"or draining; {detail})")  # fmt: skip
        return EXIT_NOT_SERVING
    if _tls_failure(detail):
        print(f"UNREACHABLE: {_tls_hint(args.target, detail)}")
    else:
        print(f"UNREACHABLE: {_no_server(args.target)} ({detail})")
    return EXIT_UNREACHABLE


def _info(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToJson

    with _client(args) as client:
        try:
            info = client.info()
        except grpc.RpcError as exc:
            raise _rpc_error(args.target, exc) from None
        print(MessageToJson(info, always_print_fields_with_no_presence=True))
    return 0


def _rerank(args: argparse.Namespace) -> int:
    import grpc

    with _client(args) as client:
        try:
            result = client.rerank(
                args.query, args.doc, top_n=args.top_n, instruction=args.instruction, timeout=args.timeout
            )
        except grpc.RpcError as exc:
            raise _rpc_error(args.target, exc) from None
    t = result.timings
    print(
        f"model {result.model_id} ({result.model_revision}); queue {t.queue_seconds * 1000:.1f} ms, "
        f"inference {t.inference_seconds * 1000:.1f} ms"
    )
    fused = result.fusion.method.value != "none"
    if fused:
        print(f"ranked by fused score: {result.fusion.describe()} (model score in brackets)")
    for rank, hit in enumerate(result.hits, 1):
        score = f"{hit.ranking_score:+.4f} ({hit.score:+.4f})" if fused else f"{hit.score:+.4f}"
        print(f"{rank:3d}. {score}  [{hit.index}] {args.doc[hit.index][:100]}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from pathlib import PurePath

    from sidecar.settings import Settings, env_name, flag_name

    print("| flag | env | default | what it does, and the trade-off |\n| --- | --- | --- | --- |")
    for name, field in Settings.model_fields.items():
        default = str(field.default) if isinstance(field.default, PurePath) else field.default
        print(f"| `{flag_name(name)}` | `{env_name(name)}` | `{default!r}` | {field.description} |")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from sidecar.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerank-sidecar",
        description="Reranking sidecar for search engines (gRPC + HTTP, shared batches).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the sidecar (gRPC, HTTP/JSON and metrics)")
    _add_settings_flags(p)
    p.set_defaults(func=_serve)

    import os

    target: dict[str, typing.Any] = {
        "default": f"127.0.0.1:{os.environ.get('RERANK_GRPC_PORT', '50051')}",
        "help": "gRPC address of the sidecar (default 127.0.0.1:$RERANK_GRPC_PORT or :50051)",
    }

    def add_target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", **target)
        p.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA roots")
        p.add_argument(
            "--ca-file", default=None, help="PEM CA that signed the sidecar's certificate (implies TLS)"
        )
        p.add_argument("--client-cert", default=None, help="PEM client certificate, for a mutual-TLS sidecar")
        p.add_argument("--client-key", default=None, help="PEM private key of --client-cert")
        p.add_argument(
            "--token",
            default=os.environ.get("RERANK_AUTH_TOKEN"),
            help="bearer token of a sidecar started with one (default $RERANK_AUTH_TOKEN; the environment "
            "keeps it out of the process list)",
        )

    p = sub.add_parser(
        "health",
        help="exit 0 if the sidecar reports SERVING, 1 if it is up but NOT_SERVING (loading, draining), "
        "3 if nothing answers at --target",
    )
    add_target(p)
    p.add_argument("--service", default="", help="health service name ('' = whole server)")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=_health)

    p = sub.add_parser("info", help="print the served model and limits (Info RPC)")
    add_target(p)
    p.set_defaults(func=_info)

    p = sub.add_parser("rerank", help="rerank a few documents from the command line")
    add_target(p)
    p.add_argument("--query", required=True)
    p.add_argument("--doc", action="append", required=True, help="a document (repeat the flag)")
    p.add_argument("--top-n", type=int, default=None)
    p.add_argument(
        "--instruction",
        default=None,
        help="task instruction (instruction-aware models only, e.g. LLM rerankers)",
    )
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=_rerank)

    p = sub.add_parser("config", help="print the settings reference (flags, env vars, defaults) as Markdown")
    p.set_defaults(func=_config)

    p = sub.add_parser("bench", help="benchmark the running stack against sentence-transformers on SciFact")
    from sidecar.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=_bench)

    # Their registration imports nothing heavy: torch, pyserini and opensearch-py load in the handlers.
    from sidecar.eval.cli import register as register_eval
    from sidecar.guard import register as register_guard
    from sidecar.opensearch.cli import register as register_opensearch
    from sidecar.training.cli import register as register_training

    register_eval(sub)
    register_training(sub)
    register_opensearch(sub)
    register_guard(sub)
    return parser


def _debug() -> bool:
    import os

    return os.environ.get("RERANK_LOG_LEVEL", "").upper() == "DEBUG"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if _debug() or getattr(args, "log_level", None) == "DEBUG":
            raise
        print(f"rerank-sidecar {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
