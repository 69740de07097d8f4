"""A sidecar served on a non-torch runtime says so (gRPC Info, HTTP /v1/info, /metrics, the log) and
scores like the reference; a runtime that is missing or cannot run the model stops the start with one line."""

from __future__ import annotations

import logging
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from sidecar.client import RerankerClient
from tests.conftest import test_settings
from tests.opensearch.conftest import http_request

DOCS = [
    "Vaccines train the immune system to recognise and fight a pathogen.",
    "The stock market fell sharply after the central bank raised rates.",
    "A recipe for banana bread with walnuts.",
    "Antibodies made after immunisation neutralise the virus.",
]
QUERY = "how do vaccines protect against disease"


def test_packaged_model_served_on_openvino_reports_it_everywhere(
    server_factory, export_dir: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    from sidecar.model_factory import packaged_embedding_model_dir

    settings = test_settings(runtime="openvino", dtype="float32", export_cache_dir=str(export_dir))
    with caplog.at_level(logging.INFO, logger="sidecar.service"):
        srv = server_factory(settings)
    assert any(
        r.getMessage().startswith("serving ")
        and "(bi-encoder on cpu, runtime openvino, float32)" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    with RerankerClient(srv.target) as client:
        info = client.info()
        result = client.rerank(QUERY, DOCS)
    assert (info.runtime, info.dtype, info.device) == ("openvino", "float32", "cpu")
    http_info = http_request(f"http://127.0.0.1:{srv.server.http_port}", "GET", "/v1/info").json()
    assert (http_info["runtime"], http_info["dtype"]) == ("openvino", "float32")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.http_port}/metrics", timeout=5).read()
    assert b'reranker_runtime_info{precision="float32",runtime="openvino"} 1.0' in metrics

    st = SentenceTransformer(str(packaged_embedding_model_dir()), device="cpu")
    q = st.encode([QUERY], normalize_embeddings=True)
    d = st.encode(DOCS, normalize_embeddings=True)
    reference = (d @ q[0]).astype(np.float32)
    got = np.empty(len(DOCS), dtype=np.float32)
    for hit in result.hits:
        got[hit.index] = hit.score
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)


def _serve(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    argv = ["serve", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", *args]
    code = f"{prelude}\nimport sys\nfrom sidecar.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# Makes `import openvino` fail as on a machine without the [cpu] extra.
_NO_OPENVINO = """
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name == "openvino" or name.startswith("openvino."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Missing())
"""


def test_a_runtime_that_is_not_installed_is_one_line(bert_ce_dir: Path, tmp_path: Path) -> None:
    proc = _serve(
        "--model",
        str(bert_ce_dir),
        "--runtime",
        "openvino",
        "--export-cache-dir",
        str(tmp_path),
        prelude=_NO_OPENVINO,
    )
    line = _one_error_line(proc)
    assert "--runtime openvino needs openvino" in line and "rerank-sidecar[cpu]" in line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--runtime", "onnxruntime", "--dtype", "bfloat16"], "--runtime onnxruntime runs float32"),
        (["--runtime", "openvino", "--device", "cuda"], "--runtime openvino runs on the CPU"),
    ],
)
def test_a_precision_or_device_a_runtime_lacks_is_one_line(
    args: list[str], expected: str, bert_ce_dir: Path, tmp_path: Path
) -> None:
    proc = _serve("--model", str(bert_ce_dir), "--export-cache-dir", str(tmp_path), *args)
    assert expected in _one_error_line(proc)


def test_a_causal_lm_reranker_cannot_be_exported_one_line(tmp_path: Path) -> None:
    from sidecar.model_factory import build_causal_lm, build_llm_tokenizer, llm_tokenizer_corpus

    out = tmp_path / "qwen3-reranker-tiny"
    model = build_causal_lm(out, build_llm_tokenizer(out, llm_tokenizer_corpus()), hidden=16, layers=1)
    proc = _serve("--model", str(model), "--runtime", "onnxruntime", "--export-cache-dir", str(tmp_path))
    line = _one_error_line(proc)
    assert "--runtime onnxruntime cannot run causal-LM rerankers" in line and "--runtime torch" in line
