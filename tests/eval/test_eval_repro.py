"""The reproduction file: it parses, its commands are valid replay commands, and the runner grades scores."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
from rich.console import Console

from sidecar.eval import repro
from sidecar.eval.cli import add_replay_arguments
from sidecar.eval.datasets import Dataset, repo_root


def test_the_repo_reproduction_file_is_valid() -> None:
    conditions = repro.load(repo_root() / repro.DEFAULT_FILE)
    by_name = {c.name: c for c in conditions}
    bm25 = by_name["scifact.bm25-flat"]
    assert bm25.fast
    assert bm25.expected == {
        "first_stage.ndcg@10": 0.6789,
        "first_stage.recall@100": 0.9253,
        "first_stage.recall@1000": 0.9767,
    }
    assert bm25.tolerance == 0.0
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_replay_arguments(parser)
    for c in conditions:
        argv = shlex.split(c.command.replace("{repo}", str(repo_root())))
        assert argv[:2] == ["rerank-sidecar", "replay"], c.name
        assert "{output}" in c.command, c.name
        args = parser.parse_args([a.replace("{output}", "/tmp/x") for a in argv[2:]])
        assert args.output == "/tmp/x"
        if args.fusion not in (None, "server", "none", "rrf", "blend"):
            assert Path(args.fusion).is_file(), (c.name, args.fusion)  # shipped with the repository
        assert c.dataset and c.first_stage and c.expected, c.name
        for key in c.expected:
            stage, _, metric = key.partition(".")
            assert stage in ("first_stage", "reranked", "reranked_no_fusion") and "@" in metric, (c.name, key)
    assert repro.select(conditions, fast=True)
    assert all(c.fast for c in repro.select(conditions, fast=True))


def test_grading() -> None:
    assert repro.Check("k", 0.6789, 0.678912).status(0.0) == "OK"  # equal at four decimals
    assert repro.Check("k", 0.6789, 0.6786).status(0.0005) == "within tolerance"
    assert repro.Check("k", 0.6789, 0.6780).status(0.0005) == "FAIL"
    assert repro.Check("k", 0.6789, None).status(1.0) == "FAIL"


def test_argv_runs_through_this_interpreter() -> None:
    argv = repro.argv_for("rerank-sidecar replay --output {output}", Path("/tmp/a b"))
    assert argv[1:3] == ["-m", "sidecar.eval"]
    assert argv[-1] == "/tmp/a b"


def test_malformed_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[condition]]\nname = 'x'\n")
    with pytest.raises(repro.ReproError, match="malformed"):
        repro.load(bad)
    bad.write_text("not = [toml")
    with pytest.raises(repro.ReproError):
        repro.load(bad)
    with pytest.raises(repro.ReproError, match="no such"):
        repro.find_file(str(tmp_path / "missing.toml"))


@pytest.mark.slow
def test_runner_grades_a_real_run(tiny: Dataset, tmp_path: Path) -> None:
    file = tmp_path / "tiny.toml"
    command = (
        f"rerank-sidecar replay --dataset-dir {tiny.path} --cache-dir {tmp_path / 'cache'} --api none "
        "--hits 10 --warmup 0 --no-plots --output {output}"
    )
    expected = {"first_stage.recall@10": 1.0, "first_stage.mrr@10": 0.99, "first_stage.ndcg@10": 0.5}
    lines = [
        "[[condition]]",
        'name = "tiny.bm25"',
        'dataset = "tiny"',
        'first_stage = "bm25"',
        f"command = {json.dumps(command)}",
        "tolerance = 0.02",
        "[condition.expected]",
        *(f'"{k}" = {v}' for k, v in expected.items()),
    ]
    file.write_text("\n".join(lines) + "\n")
    conditions = repro.load(file)
    console = Console(record=True, width=120)
    outcomes = repro.run_all(conditions, tmp_path / "runs", console=console)
    statuses = [c.status(0.02) for c in outcomes[0].checks]
    assert statuses == ["OK", "within tolerance", "FAIL"]
    assert not outcomes[0].passed
    text = console.export_text()
    assert "within tolerance" in text and "FAIL" in text and "0/1 conditions reproduced" in text
