"""Thread settings that fit the cores: the model's intra-op threads take the cores this process may use
(affinity, capped by a container's CPU quota), tokenizing stays out of its way."""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.scoring.base import Scorer
from sidecar.threads import tokenize_workers, usable_cores


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU still gets one thread
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text(f"{(affinity + 8) * 100000 - 50000} 100000\n")  # a quota above the affinity
    assert usable_cores(cpu_max) == affinity
    assert usable_cores(tmp_path / "absent") == affinity


def test_small_machines_tokenize_in_one_thread() -> None:
    assert [tokenize_workers(c) for c in (1, 2, 3, 4, 64)] == [1, 1, 1, 2, 2]


def test_a_loaded_cpu_model_uses_every_usable_core_and_a_single_threaded_tokenizer(
    bert_scorer: Scorer,
) -> None:
    import torch

    assert torch.get_num_threads() == usable_cores()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
