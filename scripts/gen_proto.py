"""Regenerate sidecar/_proto from proto/ (the committed generated code; tests diff it against a fresh run).

Usage: python scripts/gen_proto.py [OUT_DIR]   (default: sidecar/_proto)
protoc writes absolute imports (`from reranker.v1 import ...`); they are rewritten to live under
`sidecar._proto` so the generated package needs no sys.path tricks.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
    ]
    if protoc.main([*args, *protos]) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out.rglob("*.py*")):
        text = re.sub(r"^from reranker\.", "from sidecar._proto.reranker.", path.read_text(), flags=re.M)
        path.write_text(text)
        written.append(path)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "sidecar" / "_proto"
    for p in generate(target):
        print(p.relative_to(target))
