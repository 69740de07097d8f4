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
    """Every condition is a command the replay accepts (its own argument check included), that reports every
    figure the condition expects, with any fusion file it names shipped in the repository."""
    from sidecar.eval.cli import _validate, fusion_option
    from sidecar.eval.report import metric_names

    conditions = repro.load(repo_root() / repro.DEFAULT_FILE)
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_replay_arguments(parser)
    for c in conditions:
        argv = shlex.split(c.command.replace("{repo}", str(repo_root())))
        assert argv[:2] == ["rerank-sidecar", "replay"], c.name
        assert "{output}" in c.command, c.name
        args = parser.parse_args([a.replace("{output}", "/tmp/x") for a in argv[2:]])
        assert args.output == "/tmp/x"
        assert _validate(args) is None, (c.name, _validate(args))
        fusion_option(args)  # raises on a fusion file that is missing or malformed
        assert c.dataset and c.first_stage and c.expected, c.name
        reranks = args.api != "none" and args.depth > 0
        for key in c.expected:
            stage, _, metric = key.partition(".")
            assert stage in ("first_stage", "reranked", "reranked_no_fusion"), (c.name, key)
            assert stage == "first_stage" or reranks, (c.name, key, "the command reranks nothing")
            assert metric in metric_names(args.hits), (c.name, key, "the replay does not report it")
    fast = repro.select(conditions, fast=True)
    assert fast and all(c.fast for c in fast)


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
