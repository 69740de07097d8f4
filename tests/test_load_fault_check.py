"""CI runs the project's load-and-fault check (scripts/load_fault_check.py) on a small budget: real
server process, concurrent gRPC and HTTP clients with cancellations and deadlines, a SIGTERM in the
middle; every answer equals its solo reference and every request gets an answer or a clear status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_fault_check.py"


def test_load_and_fault_check_passes(bert_ce_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = ["--model", str(bert_ce_dir), "--seconds", "12", "--grpc-clients", "4", "--http-clients", "4"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--drain-seconds", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == []
    outcomes = report["outcomes"]
    # Both front ends answered, and the SIGTERM came while clients were still sending.
    assert outcomes.get("grpc ok", 0) > 0 and outcomes.get("http ok", 0) > 0
    assert (
        outcomes.get("grpc UNAVAILABLE", 0)
        + outcomes.get("http 503", 0)
        + outcomes.get("http refused after SIGTERM", 0)
        > 0
    )
    assert report["exit_code"] == 0 and report["exit_seconds_after_sigterm"] < 3 + 5
    assert report["peak_rss_mb"] > 0
