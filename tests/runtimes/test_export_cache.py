"""The export cache: a second start reuses the export (no exporter runs), the key follows the model's
content, the calibration set and the int8 recipe, half-written entries are never read, bad calibration
files get one line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from sidecar.scoring import runtimes
from sidecar.scoring.base import Pair
from sidecar.scoring.runtimes import calibration_pairs
from tests.conftest import make_scorer

PAIRS = [Pair("how do vaccines work", "Vaccines train the immune system."), Pair("q", "an unrelated text")]


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def _load(model: Path, cache: Path, caplog: pytest.LogCaptureFixture, **kw: object):  # type: ignore[no-untyped-def]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sidecar.scoring.runtimes"):
        scorer = make_scorer(model, runtime="openvino", dtype="float32", export_cache_dir=str(cache), **kw)
    return scorer, [r.getMessage() for r in caplog.records]


def test_second_start_reuses_the_export(bert_ce_dir: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "exports"
    first, log1 = _load(bert_ce_dir, cache, caplog)
    assert any(m.startswith("export cache: exporting") for m in log1)
    (entry,) = _entries(cache)  # one finished entry, no temporary directory left behind
    assert not entry.startswith(".tmp-")
    stamp = {p.name: p.stat().st_mtime_ns for p in (cache / entry).iterdir()}
    assert "model.xml" in stamp and json.loads((cache / entry / "key.json").read_text())["key"]

    second, log2 = _load(bert_ce_dir, cache, caplog)
    assert not any("exporting" in m for m in log2)
    assert any(m == f"export cache: reusing {cache / entry}" for m in log2)
    assert _entries(cache) == [entry]
    assert {p.name: p.stat().st_mtime_ns for p in (cache / entry).iterdir()} == stamp
    np.testing.assert_array_equal(second.score(PAIRS), first.score(PAIRS))


def test_the_key_follows_model_content_and_calibration(bert_ce_dir: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "exports"
    model = shutil.copytree(bert_ce_dir, tmp_path / "model")
    _load(model, cache, caplog)
    # New weights under the same path: a new content hash, so a new export (never the stale one).
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k in weights if k.endswith("classifier.weight"))
    weights[name] = weights[name] * -1
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    _, log = _load(model, cache, caplog)
    assert any(m.startswith("export cache: exporting") for m in log)
    assert len(_entries(cache)) == 2

    # int8: the calibration set is part of the key.
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"query": p.query, "document": p.document}) + "\n" for p in PAIRS))
    _load(model, cache, caplog, quantize="int8")
    _, log = _load(model, cache, caplog, quantize="int8", calibration_file=str(calib))
    assert any(m.startswith("export cache: exporting") for m in log)
    _, log = _load(model, cache, caplog, quantize="int8", calibration_file=str(calib))
    assert not any("exporting" in m for m in log)
    assert len(_entries(cache)) == 4


def test_a_half_written_entry_is_never_read(bert_ce_dir: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "exports"
    _load(bert_ce_dir, cache, caplog)
    (entry,) = _entries(cache)
    # A start that died mid-export leaves only a temporary directory; the final name never exists.
    shutil.move(str(cache / entry), str(cache / ".tmp-crashed"))
    (cache / ".tmp-crashed" / "model.bin").write_bytes(b"truncated")
    scorer, log = _load(bert_ce_dir, cache, caplog)
    assert any(m.startswith("export cache: exporting") for m in log)
    assert np.all(np.isfinite(scorer.score(PAIRS)))


def test_the_builtin_calibration_set_is_varied_natural_text() -> None:
    pairs = calibration_pairs(None)
    assert len(pairs) >= 200
    assert len({q for q, _ in pairs}) >= 80 and len({d for _, d in pairs}) >= 150
    lengths = [len(d.split()) for _, d in pairs]
    assert min(lengths) < 25 and max(lengths) > 60


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"query": "q", "document": "d"}\nnot json\n', "line 2: expected a JSON object"),
        ('{"query": "q"}\n', "line 1: expected a JSON object"),
        ('{"query": "", "document": "d"}\n', 'line 1: "query" and "document" must be non-empty strings'),
        ("\n\n", "holds no pairs"),
    ],
)
def test_a_bad_calibration_file_gets_one_line(content: str, expected: str, tmp_path: Path) -> None:
    calib = tmp_path / "calib.jsonl"
    calib.write_text(content)
    with pytest.raises(ValueError, match=expected) as exc:
        calibration_pairs(str(calib))
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="cannot read it"):
        calibration_pairs(str(tmp_path / "missing.jsonl"))


def test_an_unwritable_cache_still_starts_and_says_so(bert_ce_dir: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    scorer, log = _load(bert_ce_dir, blocker / "exports", caplog)
    assert any("cannot be written" in m and "every start exports again" in m for m in log)
    assert np.all(np.isfinite(scorer.score(PAIRS)))
    assert not scorer.engine.folder.is_relative_to(blocker)  # type: ignore[attr-defined]


def test_the_int8_recipe_is_part_of_the_key(
    bert_ce_dir: Path, tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "exports"
    _load(bert_ce_dir, cache, caplog, quantize="int8")
    # An export made with another recipe (NNCF's own SmoothQuant alpha) is never read by this one.
    monkeypatch.setitem(runtimes.INT8_RECIPE, "smooth_quant_matmul_alpha", 0.95)
    _, log = _load(bert_ce_dir, cache, caplog, quantize="int8")
    assert any(m.startswith("export cache: exporting") for m in log)
    assert len(_entries(cache)) == 2
    monkeypatch.undo()
    _, log = _load(bert_ce_dir, cache, caplog, quantize="int8")
    assert not any("exporting" in m for m in log)
