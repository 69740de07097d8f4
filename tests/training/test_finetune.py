"""A tiny fine-tuning run end to end: the CLI trains a tiny random cross-encoder on a SciFact train slice,
its loss goes down, it writes a model card, chooses fusion weights on its dev queries, and the directory is
then served by a real sidecar process with the same scores sentence-transformers gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_training_loss_decreases(finetuned: Path) -> None:
    # Per-step losses of a tiny model on 8-pair batches are too noisy to compare; the mean loss over all the
    # training pairs, before and after, is not.
    report = json.loads((finetuned / "training.json").read_text())["report"]
    assert len(report["loss_history"]) >= 6
    assert report["train_loss_after"] < 0.8 * report["train_loss_before"], report


def test_output_records_data_split_and_hyper_parameters(finetuned: Path, scifact_train_slice: Path) -> None:
    record = json.loads((finetuned / "training.json").read_text())
    assert record["dataset"]["split"] == "train"
    assert record["config"]["loss"] == "BinaryCrossEntropyLoss"
    report = record["report"]
    # pos_weight is negatives per positive, as mined.
    negatives = report["examples"]["pairs"] - report["examples"]["positives"]
    assert record["config"]["pos_weight"] == pytest.approx(
        negatives / report["examples"]["positives"], abs=1e-4
    )
    # The dev queries are training queries the model never trained on.
    dev = (finetuned / "dev_qids.txt").read_text().split()
    train_qids = {
        line.split("\t")[0]
        for line in (scifact_train_slice / "qrels" / "train.tsv").read_text().splitlines()[1:]
    }
    assert len(dev) == 4 and set(dev) <= train_qids
    assert report["train_queries"] + report["dev_queries"] == len(train_qids)
    card = (finetuned / "README.md").read_text()
    for needle in (
        "split **train** only",
        "pos_weight",
        "learning_rate",
        "Dev evaluation",
        "ndcg@10",
    ):
        assert needle in card
    assert (finetuned / "training_curves.png").stat().st_size > 0


def test_fusion_weights_were_chosen_on_dev_queries(
    finetuned: Path, scifact_train_slice: Path, training_cache: Path
) -> None:
    """The recorded figures are recomputed independently: BM25 top-10 of each dev query, scored by
    sentence-transformers' `CrossEncoder.predict` (the reference, not the sidecar), ranked by the blend /
    RRF formula written out here, judged by trec_eval. A tuning step that reported a figure it did not
    measure, tuned on other queries or applied a fusion other than the one it wrote, fails."""
    from sentence_transformers import CrossEncoder

    from sidecar.eval import datasets as beir
    from sidecar.eval.bm25 import LuceneBm25
    from sidecar.eval.metrics import evaluate_scored

    fusion = json.loads((finetuned / "fusion.json").read_text())
    assert fusion["chosen_on"]["split"] == "train"
    assert fusion["chosen_on"]["queries"] == 4
    assert "dev_qids.txt" in fusion["chosen_on"]["query_set"]
    assert fusion["method"] in {"none", "blend", "rrf"}

    data = beir.load(scifact_train_slice, split="train")
    dev = (finetuned / "dev_qids.txt").read_text().split()
    bm25 = LuceneBm25(data, cache_root=training_cache)
    try:
        hits = {q: bm25.search(data.queries[q], 10) for q in dev}
    finally:
        bm25.close()
    model = CrossEncoder(str(finetuned), device="cpu")
    lists = {}
    for q, qh in hits.items():
        raw = model.predict([(data.queries[q], data.corpus[h.doc_id].joined()) for h in qh])
        lists[q] = ([h.doc_id for h in qh], [float(x) for x in raw], [h.score for h in qh])

    def fused(spec: dict, raw: list[float], first: list[float]) -> list[float]:
        if spec["method"] == "none":
            return raw
        if spec["method"] == "rrf":
            k = spec.get("rrf_k", 60)
            r_rank = {i: n for n, i in enumerate(sorted(range(len(raw)), key=lambda i: (-raw[i], i)), 1)}
            f_rank = {i: n for n, i in enumerate(sorted(range(len(first)), key=lambda i: (-first[i], i)), 1)}
            return [1 / (k + r_rank[i]) + 1 / (k + f_rank[i]) for i in range(len(raw))]

        def norm(xs: list[float]) -> list[float]:
            if spec["normalization"] == "minmax":
                lo, hi = min(xs), max(xs)
                return [0.0 if hi == lo else (x - lo) / (hi - lo) for x in xs]
            mu = sum(xs) / len(xs)
            sd = (sum((x - mu) ** 2 for x in xs) / len(xs)) ** 0.5
            return [0.0 if sd == 0 else (x - mu) / sd for x in xs]

        a = spec["alpha"]
        return [a * r + (1 - a) * f for r, f in zip(norm(raw), norm(first), strict=True)]

    def ndcg(spec: dict) -> float:
        scored = {q: (ids, fused(spec, raw, first)) for q, (ids, raw, first) in lists.items()}
        return evaluate_scored(data.qrels_for(dev), scored, ["ndcg@10"])["ndcg@10"]

    chosen = {k: v for k, v in fusion.items() if k in ("method", "alpha", "normalization", "rrf_k")}
    assert ndcg(chosen) == pytest.approx(fusion["ndcg@10"]["chosen"], abs=1e-6)
    assert ndcg({"method": "none"}) == pytest.approx(fusion["ndcg@10"]["no_fusion"], abs=1e-6)
    first_stage = {q: (ids, first) for q, (ids, _, first) in lists.items()}
    assert evaluate_scored(data.qrels_for(dev), first_stage, ["ndcg@10"])["ndcg@10"] == pytest.approx(
        fusion["ndcg@10"]["first_stage"], abs=1e-6
    )
    card = (finetuned / "README.md").read_text()
    assert "## Score fusion" in card and card.count("## Score fusion") == 1
    assert f"{fusion['ndcg@10']['chosen']:.4f}" in card


def test_finetuned_directory_is_served_by_the_sidecar(finetuned: Path) -> None:
    from sentence_transformers import CrossEncoder

    from sidecar.client import RerankerClient
    from sidecar.fusion import NO_FUSION, load_model_fusion
    from sidecar.launch import SidecarProcess
    from sidecar.types import Document

    query = "vitamin D deficiency and bone fractures"
    docs = [
        "Low serum vitamin D was associated with a higher risk of hip fracture in older adults.",
        "The mitochondrial genome encodes thirteen proteins of the respiratory chain.",
        "Bone mineral density declines with age in both sexes.",
    ]
    expected = CrossEncoder(str(finetuned), device="cpu").predict([(query, d) for d in docs])
    with SidecarProcess(["--model", str(finetuned)]) as sc, RerankerClient(sc.grpc_target) as client:
        info = client.info()
        assert info.backend == "cross-encoder" and info.model_id == str(finetuned.resolve())
        result = client.rerank(query, docs, fusion=NO_FUSION)
        got = {h.index: h.score for h in result.hits}
        for i, want in enumerate(expected):
            assert got[i] == pytest.approx(float(want), abs=1e-4)
        # With the default fusion (auto), the fusion.json written by the tuning step applies.
        scored = [Document(text=d, first_stage_score=s) for d, s in zip(docs, (12.0, 9.5, 3.0), strict=True)]
        applied = client.rerank(query, scored).fusion
        assert applied == load_model_fusion(finetuned)


def test_embedding_model_base_gets_a_mean_pooling_head_that_serves(
    packaged_model_dir: Path, bert_ce_dir: Path, modernbert_ce_dir: Path, tmp_path: Path
) -> None:
    from sentence_transformers import CrossEncoder

    from sidecar.training.finetune import is_embedding_model, load_base
    from tests.conftest import make_scorer

    assert is_embedding_model(str(packaged_model_dir))
    assert not is_embedding_model(str(bert_ce_dir)) and not is_embedding_model(str(modernbert_ce_dir))

    model, name = load_base(str(packaged_model_dir), max_length=64, seed=1, device="cpu")
    assert "mean-pooling head" in name
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense"]
    out = tmp_path / "mean-head"
    model.save_pretrained(str(out))
    pairs = [("vitamin D and fractures", "Low vitamin D raises fracture risk."), ("a", "unrelated text")]
    expected = CrossEncoder(str(out), device="cpu").predict(pairs)
    from sidecar.scoring.base import Pair

    scorer = make_scorer(out)
    assert scorer.info.backend == "cross-encoder"
    got = scorer.score([Pair(q, d) for q, d in pairs])
    assert got == pytest.approx(expected, abs=1e-5)
    # Seeded: the same base and seed give the same fresh head.
    again, _ = load_base(str(packaged_model_dir), max_length=64, seed=1, device="cpu")
    assert again.predict(pairs) == pytest.approx(expected, abs=1e-6)
