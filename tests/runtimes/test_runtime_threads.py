"""OpenVINO and ONNX Runtime size their thread pools as torch does (sidecar/threads.py): the cores this
process may use, a container's CPU quota included, not every core of the node."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import threads
from tests.conftest import make_scorer


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_exported_runtimes_use_the_usable_cores(
    runtime: str, bert_ce_dir: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One core fewer than the machine offers when it has more than one (a quota), so the pool size is
    # ours and not a runtime default that happens to match.
    import os

    wanted = max(1, (os.cpu_count() or 1) - 1)
    monkeypatch.setattr(threads, "usable_cores", lambda *a: wanted)
    scorer = make_scorer(bert_ce_dir, runtime=runtime, dtype="float32", export_cache_dir=str(export_dir))
    engine = scorer.engine  # type: ignore[attr-defined]
    if runtime == "openvino":
        assert int(engine.compiled.get_property("INFERENCE_NUM_THREADS")) == wanted
    else:
        options = engine.session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (wanted, 1)
