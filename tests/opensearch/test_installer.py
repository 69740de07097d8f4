"""The installer's command line without a cluster (the installer itself runs against a real OpenSearch node in
test_real_cluster.py), and the rendered files in opensearch_plugin_config/ being current."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main as cli_main


def test_a_bad_paths_value_is_one_line(capsys: Any) -> None:
    assert cli_main(["opensearch", "install", "--url", "http://127.0.0.1:9", "--paths", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --paths takes rerank and/or by_field") and err.count("\n") == 1


# ---- rendered files ---------------------------------------------------------------------------
CONFIG_DIR = Path(__file__).resolve().parents[2] / "opensearch_plugin_config"
RENDERINGS = {
    "default": [],
    "deep-window": ["--fields", "passage", "--sample-factor", "4", "--index", "scifact"],
}


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_the_rendered_files_are_current(tmp_path: Path, name: str) -> None:
    """opensearch_plugin_config/<name>/ is `rerank-sidecar opensearch render --out ...` with the flags above;
    regenerate it with that command when the templates change (see opensearch_plugin_config/README.md)."""
    assert cli_main(["opensearch", "render", *RENDERINGS[name], "--out", str(tmp_path)]) == 0
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_text() for p in (CONFIG_DIR / name).iterdir() if p.suffix == ".json"}
    assert fresh == committed, f"stale: re-render opensearch_plugin_config/{name} (see its README)"
