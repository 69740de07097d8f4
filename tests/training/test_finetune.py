"""A tiny fine-tuning run end to end: the CLI trains a tiny random cross-encoder on a SciFact train slice,
its loss goes down, it writes a model card, chooses fusion weights on its dev queries, and the directory is
then served by a real sidecar process with the same scores sentence-transformers gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.model_factory import build_bert_cross_encoder


@pytest.fixture(scope="module")
def finetuned(
    scifact_train_slice: Path, training_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    base = build_bert_cross_encoder(tmp_path_factory.mktemp("base") / "tiny", max_length=128, seed=5)
    out = tmp_path_factory.mktemp("finetuned") / "model"
    code = main(
        [
            "finetune",
            "--data", str(scifact_train_slice),
            "--base", str(base),
            "--out", str(out),
            "--epochs", "6",
            "--batch-size", "8",
            "--learning-rate", "1e-3",
            "--max-length", "96",
            "--dev-fraction", "0.25",
            "--dev-depth", "10",
            "--mine-depth", "20",
            "--skip-top", "2",
            "--hard-negatives", "2",
            "--random-negatives", "1",
            "--fusion-depth", "10",
            "--measure-train-loss",
            # Pinned: 'auto' trains in bf16 on CPUs with native bf16, and the loss figures below must not
            # depend on which CPU runs the tests.
            "--precision", "float32",
            "--cache-dir", str(training_cache),
        ]
    )  # fmt: skip
    assert code == 0
    return out


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


def test_fusion_weights_were_chosen_on_dev_queries(finetuned: Path) -> None:
    fusion = json.loads((finetuned / "fusion.json").read_text())
    assert fusion["chosen_on"]["split"] == "train"
    assert fusion["chosen_on"]["queries"] == 4
    assert "dev_qids.txt" in fusion["chosen_on"]["query_set"]
    assert fusion["method"] in {"none", "blend", "rrf"}
    chosen = fusion["ndcg@10"]["chosen"]
    assert chosen == max(row["ndcg@10"] for row in fusion["grid"])
    assert chosen >= fusion["ndcg@10"]["no_fusion"]
    card = (finetuned / "README.md").read_text()
    assert "## Score fusion" in card and f"{chosen:.4f}" in card and card.count("## Score fusion") == 1


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
