"""Replace the README's configuration table with `rerank-sidecar config` (run after changing Settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    table = subprocess.run(
        [sys.executable, "-m", "sidecar", "config"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    readme = ROOT / "README.md"
    lines = readme.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| flag | env | default |"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    readme.write_text("\n".join([*lines[:start], table, *lines[end:]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
