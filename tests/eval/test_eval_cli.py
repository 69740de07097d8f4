"""The evaluator's command line: light registration, argument checks with clear exits, `dataset`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.eval.__main__ import main
from sidecar.eval.datasets import Dataset

HEAVY = ("torch", "pyserini", "jnius", "matplotlib", "sentence_transformers", "pytrec_eval", "transformers")


def test_registration_imports_nothing_heavy() -> None:
    code = (
        "import argparse, sys\n"
        "from sidecar.eval.cli import register\n"
        "p = argparse.ArgumentParser()\n"
        "register(p.add_subparsers())\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "[]"


def test_the_main_cli_offers_the_evaluator() -> None:
    from sidecar.cli import build_parser

    args = build_parser().parse_args(["replay", "--depth", "20", "--api", "http"])
    assert args.depth == 20 and args.api == "http"
    assert args.func.__name__ == "replay_command"
    assert build_parser().parse_args(["repro", "--fast"]).fast


def test_replay_help_lists_the_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["replay", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--dataset-dir",
        "--first-stage",
        "--depth",
        "--api",
        "--concurrency",
        "--qps",
        "--target",
        "--http-url",
        "--opensearch-url",
        "--output",
    ):
        assert flag in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api", "opensearch"], "--opensearch-pipeline"),
        (["--first-stage", "opensearch"], "--opensearch-url"),
        (["--depth", "200", "--hits", "100"], "more than --hits"),
        (["--concurrency", "0"], "concurrency"),
        (["--dataset-dir", "/no/such/dir"], "--dataset-dir"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENSEARCH_URL", raising=False)
    assert main(["replay", *argv]) == 2
    assert message in capsys.readouterr().err


def test_dataset_command_describes(tiny: Dataset, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dataset", "--dataset-dir", str(tiny.path)]) == 0
    out = capsys.readouterr().out
    assert "documents 5, queries 4, splits test" in out
    assert "test: 3 judged queries, 4 judgments" in out


def test_dataset_command_offline_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RERANK_CACHE_DIR", str(tmp_path))
    assert main(["dataset", "--dataset", "not-a-beir-set", "--no-download"]) == 2
    assert "--dataset-dir" in capsys.readouterr().err
