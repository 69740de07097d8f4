"""Load-and-fault check: a real `rerank-sidecar serve` on loopback ports, concurrent gRPC and HTTP
clients with cancellations and tight deadlines, a SIGTERM in the middle, and every answer checked.

Bounded and self-stopping: it runs for --seconds (SIGTERM at half time), talks to 127.0.0.1 only and
kills the server if it overstays its drain. Every answer that comes back OK must equal the same
request's solo answer (same order, scores within 1e-5; float32); every other answer must be a status
its situation allows (client cancel -> CANCELLED, tight deadline -> DEADLINE_EXCEEDED / 504, after
SIGTERM -> UNAVAILABLE / 503 / connection refused). No request may go unanswered. The server must exit 0
within the drain plus a few seconds. Prints the figures, peak RSS included; exit status 0 when every
check holds.

    python scripts/load_fault_check.py [--model DIR] [--seconds 20] [--grpc-clients 6] [--http-clients 6]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.launch import SidecarProcess

TOL = 1e-5
EXIT_SLACK_S = 5.0  # the server must exit within drain + this
# A request sent this close to the moment the listeners close may meet the closing socket (the log's
# clock has millisecond resolution; the kernel's accept queue is reset when the listener closes).
CLOSE_RACE_S = 0.05
WORDS = [
    "vaccine",
    "immune",
    "response",
    "protein",
    "folding",
    "cell",
    "membrane",
    "transport",
    "gene",
    "expression",
    "tumour",
    "growth",
    "receptor",
    "binding",
    "antibody",
    "virus",
    "infection",
    "clinical",
    "trial",
    "patient",
    "outcome",
    "dose",
    "placebo",
    "cohort",
    "risk",
    "mutation",
    "pathway",
    "signalling",
    "enzyme",
    "kinase",
    "mitochondria",
    "metabolism",
    "insulin",
    "glucose",
    "neuron",
    "synapse",
]


def _requests(rng: random.Random, n: int) -> list[tuple[str, list[str]]]:
    """Distinct requests of varied shape: short and long documents, a few past the model's length,
    one with a document of about a megabyte."""
    out = []
    for i in range(n):
        query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        docs = [
            " ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 12, 40, 120, 400])))
            for _ in range(rng.randint(1, 24))
        ]
        if i == 0:
            docs.append(" ".join(rng.choice(WORDS) for _ in range(150_000)))  # ~1 MB
        out.append((query, docs))
    return out


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    sigterm_at: float | None = None

    def add(self, outcome: str, problem: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if problem and len(self.problems) < 50:
                when = "before SIGTERM"
                if self.sigterm_at is not None:
                    when = f"{time.monotonic() - self.sigterm_at:.2f}s after SIGTERM"
                self.problems.append(f"{problem} ({when})")


def _logged_at(log: Path, marker: str) -> float | None:
    """Wall-clock time of the first server log line holding `marker` (the log's asctime format)."""
    import datetime

    for line in log.read_text(errors="replace").splitlines():
        if marker in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


def _same(order: list[int], scores: list[float], ref: tuple[list[int], list[float]]) -> bool:
    ref_order, ref_scores = ref
    if order == ref_order:
        return all(abs(a - b) <= TOL for a, b in zip(scores, ref_scores, strict=True))
    # Near-ties may swap places; then every score must still match its document's reference.
    by_index = dict(zip(ref_order, ref_scores, strict=True))
    return sorted(order) == sorted(ref_order) and all(
        abs(s - by_index[i]) <= TOL for i, s in zip(order, scores, strict=True)
    )


class Check:
    def __init__(self, args: argparse.Namespace, model: str) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.requests = _requests(self.rng, args.distinct)
        self.log_path = Path(tempfile.mkdtemp(prefix="load-fault-")) / "serve.log"
        self.sc = SidecarProcess(
            [
                "--model",
                model,
                "--dtype",
                "float32",
                "--drain-seconds",
                str(args.drain_seconds),
                "--max-wait-ms",
                "2",
            ],
            log_path=self.log_path,
            ready_timeout=300,
        )
        # Encoded once: the clients' own encoding work should not be what limits the load.
        self.messages = [self._pb(q, d) for q, d in self.requests]
        self.bodies = [json.dumps({"query": q, "documents": d}).encode() for q, d in self.requests]
        self.refs: list[tuple[list[int], list[float]]] = []
        self.solo_seconds: list[float] = []
        self.tally = Tally()
        self.sigterm_at: float | None = None
        self.stop_clients = threading.Event()
        self.no_answer: list[tuple[float, str, int, str]] = []  # (sent at, mode, request, error)
        self.grpc_cancelled: list[tuple[float, str, int]] = []  # (started at, mode, request)
        self.peak_rss_kb = 0

    # ---- phases -------------------------------------------------------------------------------
    def run(self) -> dict:
        self.sc.start()
        assert self.sc.proc is not None
        sampler = threading.Thread(target=self._sample_rss, daemon=True)
        sampler.start()
        with grpc.insecure_channel(self.sc.grpc_target) as ch:
            stub = pb_grpc.RerankerServiceStub(ch)
            for message in self.messages:
                t0 = time.perf_counter()
                reply = stub.Rerank(message, timeout=120)
                self.solo_seconds.append(time.perf_counter() - t0)
                self.refs.append(([r.index for r in reply.results], [r.score for r in reply.results]))
        rss_after_refs = self.peak_rss_kb
        clients = [
            threading.Thread(target=self._grpc_client, args=(i,), daemon=True)
            for i in range(self.args.grpc_clients)
        ] + [
            threading.Thread(target=self._http_client, args=(i,), daemon=True)
            for i in range(self.args.http_clients)
        ]
        started = time.monotonic()
        for t in clients:
            t.start()
        time.sleep(self.args.seconds / 2)
        self.sigterm_at = self.tally.sigterm_at = time.monotonic()
        self.sc.proc.send_signal(signal.SIGTERM)
        not_serving_s = self._time_to_not_serving()
        try:
            code: int | None = self.sc.proc.wait(self.args.drain_seconds + EXIT_SLACK_S + 30)
        except Exception:
            code = None
        exit_s = time.monotonic() - self.sigterm_at
        if code is None:
            self.sc.proc.kill()
            self.sc.proc.wait()
        remaining = self.args.seconds - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)  # clients keep going against the stopped server
        self.stop_clients.set()
        for t in clients:
            t.join(60)
        self.sc.stop()
        self._sort_out_no_answers()
        return {
            "requests": sum(self.tally.outcomes.values()),
            "outcomes": dict(sorted(self.tally.outcomes.items())),
            "problems": self.tally.problems,
            "exit_code": code,
            "exit_seconds_after_sigterm": round(exit_s, 2),
            "not_serving_seconds_after_sigterm": None if not_serving_s is None else round(not_serving_s, 3),
            "drain_seconds": self.args.drain_seconds,
            "peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
            "solo_request_seconds_median": round(sorted(self.solo_seconds)[len(self.solo_seconds) // 2], 3),
            "peak_rss_mb_before_load": round(rss_after_refs / 1024, 1),
            "log": str(self.log_path),
        }

    def _sort_out_no_answers(self) -> None:
        closed_at = _logged_at(self.log_path, "closing the listeners")
        for sent_at, mode, k, error in self.no_answer:
            if closed_at is not None and sent_at >= closed_at - CLOSE_RACE_S:
                self.tally.add("http reset while the listeners closed")
            elif mode == "cancel":
                self.tally.add("http abandoned by client")
            else:
                since = sent_at - (closed_at or 0)
                self.tally.add(
                    "http LOST", f"http {mode} request {k}: {error}, sent {since:+.3f}s from close"
                )
        for started_at, mode, k in self.grpc_cancelled:
            if closed_at is not None and started_at >= closed_at - CLOSE_RACE_S:
                self.tally.add("grpc cancelled while the listeners closed")
            else:
                since = started_at - (closed_at or 0)
                self.tally.add(
                    "grpc UNEXPECTED CANCELLED", f"grpc {mode} request {k}: started {since:+.3f}s from close"
                )

    def _sample_rss(self) -> None:
        assert self.sc.proc is not None
        status = Path(f"/proc/{self.sc.proc.pid}/status")
        while self.sc.proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)

    def _time_to_not_serving(self) -> float | None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert self.sigterm_at is not None
        with grpc.insecure_channel(self.sc.grpc_target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() - self.sigterm_at < 5:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    return time.monotonic() - self.sigterm_at  # already gone: not serving either
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    return time.monotonic() - self.sigterm_at
                time.sleep(0.002)
        return None

    # ---- clients ------------------------------------------------------------------------------
    @staticmethod
    def _pb(query: str, docs: list[str]) -> pb.RerankRequest:
        return pb.RerankRequest(query=query, documents=[pb.Document(text=d) for d in docs])

    def _mode(self, rng: random.Random) -> str:
        return rng.choices(["normal", "cancel", "deadline"], weights=[70, 15, 15])[0]

    def _after_sigterm(self) -> bool:
        return self.sigterm_at is not None

    def _grpc_client(self, seed: int) -> None:
        rng = random.Random(self.args.seed * 1000 + seed)
        with grpc.insecure_channel(self.sc.grpc_target) as ch:
            stub = pb_grpc.RerankerServiceStub(ch)
            while not self.stop_clients.is_set():
                k = rng.randrange(len(self.requests))
                mode = self._mode(rng)
                late = self._after_sigterm()
                timeout = rng.uniform(0.02, 0.2) if mode == "deadline" else 120.0
                started_wall = time.time()
                future = stub.Rerank.future(self.messages[k], timeout=timeout)
                if mode == "cancel":
                    time.sleep(rng.uniform(0, 0.05))
                    future.cancel()
                try:
                    reply = future.result()
                except grpc.FutureCancelledError:
                    self.tally.add("grpc cancelled by client")
                    continue
                except grpc.RpcError as err:
                    code = err.code()  # type: ignore[attr-defined]
                    allowed = {grpc.StatusCode.UNAVAILABLE} if (late or self._after_sigterm()) else set()
                    if mode == "deadline":
                        allowed.add(grpc.StatusCode.DEADLINE_EXCEEDED)
                    if mode == "cancel":
                        allowed.add(grpc.StatusCode.CANCELLED)
                    name = code.name if code else "?"
                    if code == grpc.StatusCode.CANCELLED and mode != "cancel" and self._after_sigterm():
                        # Cancelled by the server: allowed only for a call that arrived while the
                        # listeners closed (sorted out at the end, from the server log).
                        with self.tally.lock:
                            self.grpc_cancelled.append((started_wall, mode, k))
                        continue
                    if code in allowed:
                        self.tally.add(f"grpc {name}")
                    else:
                        detail = f"grpc {mode}: {name} {err.details()}"  # type: ignore[attr-defined]
                        self.tally.add(f"grpc UNEXPECTED {name}", detail)
                    if self._after_sigterm():
                        time.sleep(0.2)
                    continue
                order = [r.index for r in reply.results]
                scores = [r.score for r in reply.results]
                if _same(order, scores, self.refs[k]):
                    self.tally.add("grpc ok")
                else:
                    self.tally.add("grpc WRONG", f"grpc request {k}: {order[:5]} != {self.refs[k][0][:5]}")

    def _http_client(self, seed: int) -> None:
        rng = random.Random(self.args.seed * 2000 + seed)
        while not self.stop_clients.is_set():
            k = rng.randrange(len(self.requests))
            mode = self._mode(rng)
            late = self._after_sigterm()
            body = self.bodies[k]
            headers = {"Content-Type": "application/json"}
            if mode == "deadline":
                headers["x-rerank-timeout-ms"] = str(rng.randint(20, 200))
            socket_timeout = rng.uniform(0.01, 0.05) if mode == "cancel" else 120.0
            conn = http.client.HTTPConnection("127.0.0.1", self.sc.http_port, timeout=socket_timeout)
            sent, sent_wall = False, 0.0
            try:
                conn.connect()
                conn.request("POST", "/v1/rerank", body, headers)
                sent, sent_wall = True, time.time()
                resp = conn.getresponse()
                status, payload = resp.status, resp.read()
            except ConnectionRefusedError:
                if late or self._after_sigterm():
                    self.tally.add("http refused after SIGTERM")
                else:
                    self.tally.add("http UNEXPECTED refused", "http refused before SIGTERM")
                time.sleep(0.2)
                continue
            except TimeoutError:
                if mode == "cancel":
                    self.tally.add("http abandoned by client")
                else:
                    self.tally.add("http UNEXPECTED timeout", f"http {mode}: no answer in 120 s")
                continue
            except (http.client.HTTPException, ConnectionError) as exc:
                # No status at all ("Empty reply", a reset): lost, unless the server was closing its
                # listeners (then the request never got past the kernel's accept queue); sorted out
                # at the end, when the server log says when the listeners closed.
                with self.tally.lock:
                    self.no_answer.append(
                        (sent_wall if sent else time.time(), mode, k, f"{type(exc).__name__}")
                    )
                continue
            finally:
                conn.close()
            allowed = {200}
            if late or self._after_sigterm():
                allowed.add(503)
            if mode == "deadline":
                allowed.add(504)
            if status not in allowed:
                self.tally.add(
                    f"http UNEXPECTED {status}", f"http {mode} request {k}: {status} {payload[:200]!r}"
                )
                continue
            if status != 200:
                self.tally.add(f"http {status}")
                if status == 503:
                    time.sleep(0.2)
                continue
            results = json.loads(payload)["results"]
            order = [r["index"] for r in results]
            scores = [r["relevance_score"] for r in results]
            if _same(order, scores, self.refs[k]):
                self.tally.add("http ok")
            else:
                self.tally.add("http WRONG", f"http request {k}: {order[:5]} != {self.refs[k][0][:5]}")


def verdict(report: dict) -> list[str]:
    """The checks that failed (empty: all held)."""
    failed = [f"{name}: {n}" for name, n in report["outcomes"].items() if "WRONG" in name or "LOST" in name]
    failed += [f"{name}: {n}" for name, n in report["outcomes"].items() if "UNEXPECTED" in name]
    if report["exit_code"] != 0:
        failed.append(f"server exit code {report['exit_code']}")
    if report["exit_seconds_after_sigterm"] > report["drain_seconds"] + EXIT_SLACK_S:
        failed.append(f"server exited {report['exit_seconds_after_sigterm']}s after SIGTERM")
    if report["not_serving_seconds_after_sigterm"] is None:
        failed.append("health never reported NOT_SERVING after SIGTERM")
    oks = sum(n for name, n in report["outcomes"].items() if name.endswith(" ok"))
    if not oks:
        failed.append("no request succeeded")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory (default: a tiny BERT cross-encoder built here)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration; SIGTERM at half time")
    parser.add_argument("--grpc-clients", type=int, default=6)
    parser.add_argument("--http-clients", type=int, default=6)
    parser.add_argument(
        "--distinct", type=int, default=12, help="distinct requests (each has a solo reference)"
    )
    parser.add_argument("--drain-seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from sidecar.model_factory import build_bert_cross_encoder

        model = str(build_bert_cross_encoder(Path(tempfile.mkdtemp(prefix="load-fault-model-")) / "tiny-ce"))
    report = Check(args, model).run()
    failed = verdict(report)
    report["failed"] = failed
    print("| figure | value |\n| --- | --- |")
    for key in (
        "requests",
        "exit_code",
        "exit_seconds_after_sigterm",
        "not_serving_seconds_after_sigterm",
        "drain_seconds",
        "peak_rss_mb_before_load",
        "peak_rss_mb",
        "solo_request_seconds_median",
    ):
        print(f"| {key} | {report[key]} |")
    for name, n in report["outcomes"].items():
        print(f"| {name} | {n} |")
    for problem in report["problems"][:20]:
        print(f"problem: {problem}")
    print("PASS" if not failed else "FAIL: " + "; ".join(failed))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
