"""Peak memory against request size, and head-of-line latency behind a big request.

For each body size, a fresh `rerank-sidecar serve` (a real process on loopback ports) gets one HTTP
request holding one document of that size; the script reads the process's peak RSS (VmHWM) before
and after, and times a 3-document gRPC request sent while the big one (or --concurrency of them) is
being handled (against the same request on the idle server, measured in the same run). Prints a
Markdown table.

    python scripts/memory_bench.py [--model DIR] [--sizes-mb 1 2 4 7.5] [--concurrency 1] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from pathlib import Path

from sidecar.client import RerankerClient
from sidecar.launch import SidecarProcess


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def post(url: str, body: bytes, timeout: float = 300) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def small_request_seconds(target: str) -> float:
    with RerankerClient(target) as client:
        t0 = time.perf_counter()
        client.rerank(
            "what do vaccines do", ["Vaccines train immunity.", "Stocks fell.", "Rain."], timeout=120
        )
        return time.perf_counter() - t0


def one_size(mb: float, args: argparse.Namespace) -> dict[str, float]:
    extra = ["--max-body-bytes", str(16 << 20), "--max-documents", "1000"]
    if args.model:
        extra += ["--model", args.model]
    with SidecarProcess([*extra, "--dtype", args.dtype]) as sc:
        assert sc.proc is not None
        pid = sc.proc.pid
        idle = min(small_request_seconds(sc.grpc_target) for _ in range(3))
        before = rss_kb(pid, "VmHWM")
        words = "the patient was given a vaccine against influenza and recovered quickly "
        text = (words * (int(mb * (1 << 20)) // len(words) + 1))[: int(mb * (1 << 20))]
        body = json.dumps({"query": "influenza vaccine", "documents": [text]}).encode()
        status: list[int] = []
        bigs = [
            threading.Thread(target=lambda: status.append(post(sc.http_url + "/v1/rerank", body)))
            for _ in range(args.concurrency)
        ]
        t0 = time.perf_counter()
        for big in bigs:
            big.start()
        time.sleep(0.05)  # the big requests are on their way
        behind = small_request_seconds(sc.grpc_target)
        for big in bigs:
            big.join()
        big_s = time.perf_counter() - t0
        after = rss_kb(pid, "VmHWM")
        now = rss_kb(pid, "VmRSS")
    return {
        "mb": mb,
        "status": max(status),
        "rss_before_mb": before / 1024,
        "peak_mb": after / 1024,
        "growth_mb": (after - before) / 1024,
        "kept_mb": now / 1024,
        "big_s": big_s,
        "idle_small_ms": idle * 1000,
        "behind_small_ms": behind * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model directory (default: the packaged model)")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1.0, 2.0, 4.0, 7.5])
    parser.add_argument("--concurrency", type=int, default=1, help="big requests sent at once")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print(
        "| body MB | status | peak RSS before, MB | peak RSS after, MB | growth, MB | growth / body | "
        "RSS after, MB | big request s | 3-doc idle ms | 3-doc behind it ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mb in args.sizes_mb:
        r = one_size(mb, args)
        print(
            f"| {mb:g} | {r['status']} | {r['rss_before_mb']:.0f} | {r['peak_mb']:.0f} | "
            f"{r['growth_mb']:.0f} | {r['growth_mb'] / mb:.1f}x | {r['kept_mb']:.0f} | {r['big_s']:.2f} | "
            f"{r['idle_small_ms']:.0f} | {r['behind_small_ms']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
