"""Reproduction files: conditions with the command that produces them and the scores they must produce.

In the style of pyserini's two-click reproductions, each condition names its dataset, first stage, depth and
model, the exact command, and expected scores with a tolerance. Running it reports, per score, OK (equal at
the four decimals shown), within tolerance, or FAIL.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sidecar.eval.datasets import repo_root
from sidecar.eval.report import RESULT_JSON

DEFAULT_FILE = Path("repro") / "beir.toml"
DIGITS = 4  # the precision published tables (and ours) print; "OK" means equal at this precision


class ReproError(Exception):
    """The reproduction file is missing or malformed."""


@dataclass(frozen=True)
class Condition:
    name: str
    command: str
    expected: dict[str, float]
    tolerance: float
    fast: bool = False
    dataset: str = ""
    first_stage: str = ""
    depth: int = 0
    model: str = ""
    notes: str = ""


@dataclass
class Check:
    key: str
    expected: float
    actual: float | None

    def status(self, tolerance: float) -> str:
        if self.actual is None:
            return "FAIL"
        if round(self.actual, DIGITS) == round(self.expected, DIGITS):
            return "OK"
        if abs(self.actual - self.expected) <= tolerance + 1e-12:
            return "within tolerance"
        return "FAIL"


@dataclass
class Outcome:
    condition: Condition
    checks: list[Check] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.status(self.condition.tolerance) != "FAIL" for c in self.checks)


def find_file(path: str | None) -> Path:
    if path:
        p = Path(path)
        if not p.is_file():
            raise ReproError(f"{p}: no such reproduction file")
        return p
    for candidate in (Path.cwd() / DEFAULT_FILE, repo_root() / DEFAULT_FILE):
        if candidate.is_file():
            return candidate
    raise ReproError(f"no {DEFAULT_FILE} here or in {repo_root()}; pass --file")


def load(path: Path) -> list[Condition]:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ReproError(f"{path}: {exc}") from None
    out = []
    for i, raw in enumerate(data.get("condition", [])):
        try:
            expected = {str(k): float(v) for k, v in raw["expected"].items()}
            out.append(
                Condition(
                    name=str(raw["name"]),
                    command=str(raw["command"]),
                    expected=expected,
                    tolerance=float(raw.get("tolerance", 0.0)),
                    fast=bool(raw.get("fast", False)),
                    dataset=str(raw.get("dataset", "")),
                    first_stage=str(raw.get("first_stage", "")),
                    depth=int(raw.get("depth", 0)),
                    model=str(raw.get("model", "")),
                    notes=str(raw.get("notes", "")),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReproError(f"{path}: condition #{i + 1} is malformed ({exc!r})") from None
    if not out:
        raise ReproError(f"{path}: no [[condition]] entries")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ReproError(f"{path}: condition names must be unique")
    return out


def select(
    conditions: Sequence[Condition], *, fast: bool = False, names: Sequence[str] = ()
) -> list[Condition]:
    chosen = [c for c in conditions if (not fast or c.fast) and (not names or c.name in names)]
    return chosen


def argv_for(command: str, output: Path) -> list[str]:
    """The command as a process argv; `rerank-sidecar` runs through this interpreter's `-m sidecar.eval`, so a
    checkout reproduces without an installed entry point (the parser is the same). `{repo}` is this checkout's
    root, for files the repository ships (such as fusion weights)."""
    command = command.replace("{repo}", shlex.quote(str(repo_root())))
    argv = shlex.split(command.replace("{output}", shlex.quote(str(output))))
    if argv and argv[0] == "rerank-sidecar":
        argv = [sys.executable, "-m", "sidecar.eval", *argv[1:]]
    return argv


def lookup(result: dict[str, Any], key: str) -> float | None:
    """`stage.metric` (e.g. `reranked.ndcg@10`) in a replay's result.json."""
    stage, _, metric = key.partition(".")
    value = result.get("metrics", {}).get(stage, {}).get(metric)
    return None if value is None else float(value)


def run_condition(condition: Condition, output_root: Path) -> Outcome:
    output = output_root / condition.name
    outcome = Outcome(condition)
    started = time.perf_counter()
    argv = argv_for(condition.command, output)
    proc = subprocess.run(argv, check=False)
    outcome.seconds = time.perf_counter() - started
    result_path = output / RESULT_JSON
    if proc.returncode != 0 or not result_path.is_file():
        outcome.error = f"command exited {proc.returncode}" + (
            "" if result_path.is_file() else ", no result.json"
        )
        if not result_path.is_file():
            return outcome
    result = json.loads(result_path.read_text())
    outcome.checks = [Check(k, v, lookup(result, k)) for k, v in condition.expected.items()]
    return outcome


def run_all(
    conditions: Sequence[Condition], output_root: Path, console: Console | None = None
) -> list[Outcome]:
    console = console or Console()
    outcomes = []
    for c in conditions:
        console.rule(
            f"{c.name}: {c.dataset}, {c.first_stage}" + (f", depth {c.depth}, {c.model}" if c.depth else "")
        )
        console.print(f"$ {c.command.replace('{output}', str(output_root / c.name))}", highlight=False)
        outcomes.append(run_condition(c, output_root))
    print_outcomes(outcomes, console)
    return outcomes


def print_outcomes(outcomes: Sequence[Outcome], console: Console) -> None:
    table = Table(title="reproduction")
    for col in ("condition", "score", "expected", "actual", "status"):
        # Fold long names instead of eliding them: a reader must be able to tell the conditions apart.
        table.add_column(col, justify="right" if col in ("expected", "actual") else "left", overflow="fold")
    colors = {"OK": "green", "within tolerance": "yellow", "FAIL": "bold red"}
    for o in outcomes:
        if o.error and not o.checks:
            table.add_row(o.condition.name, "—", "—", "—", f"[bold red]FAIL[/] ({o.error})")
            continue
        for ch in o.checks:
            st = ch.status(o.condition.tolerance)
            actual = "—" if ch.actual is None else f"{ch.actual:.{DIGITS}f}"
            note = f" (±{o.condition.tolerance:g})" if st == "within tolerance" else ""
            table.add_row(
                o.condition.name, ch.key, f"{ch.expected:.{DIGITS}f}", actual, f"[{colors[st]}]{st}[/]{note}"
            )
        if o.error:
            table.add_row(o.condition.name, "—", "—", "—", f"[bold red]FAIL[/] ({o.error})")
    console.print(table)
    passed = sum(o.passed for o in outcomes)
    console.print(
        f"{passed}/{len(outcomes)} conditions reproduced ({sum(o.seconds for o in outcomes):.0f} s)"
    )
