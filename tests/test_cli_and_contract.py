"""The CLI stays light, the settings have env twins, and the generated code matches the proto."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import build_parser, settings_from_args

ROOT = Path(__file__).resolve().parents[1]


def test_help_is_instant_without_torch() -> None:
    code = "import sys; from sidecar.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_flags_and_env_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_MAX_BATCH_TOKENS", "4096")
    monkeypatch.setenv("RERANK_GRPC_PORT", "6000")
    args = build_parser().parse_args(["serve", "--grpc-port", "7000", "--no-warmup", "--dtype", "float32"])
    s = settings_from_args(args)
    assert s.grpc_port == 7000  # the flag wins over the env
    assert s.max_batch_tokens == 4096  # the env applies where no flag was given
    assert s.warmup is False and s.dtype == "float32" and s.host == "127.0.0.1"


def test_config_reference_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.settings import Settings

    args = build_parser().parse_args(["config"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"RERANK_{name.upper()}" in out


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gen_proto import generate
    finally:
        sys.path.pop(0)
    generate(tmp_path)
    committed = ROOT / "sidecar" / "_proto"
    for fresh in tmp_path.rglob("*.py*"):
        rel = fresh.relative_to(tmp_path)
        assert filecmp.cmp(fresh, committed / rel, shallow=False), f"{rel} is stale: run scripts/gen_proto.py"


def test_proto_passes_buf_lint() -> None:
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    out = subprocess.run([buf, "lint"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_configuration_table_matches_settings(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["config"])
    args.func(args)
    table = capsys.readouterr().out.strip()
    assert table in (ROOT / "README.md").read_text(), (
        "README's configuration table is stale: paste `rerank-sidecar config`"
    )
