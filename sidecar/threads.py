"""How the sidecar's threads share the CPU: the model's intra-op pool takes every core this process may
use, and tokenizing runs beside it in few threads with no parallel pool of its own.

On a CPU the forward pass is nearly all the work (the model thread holds ~99% of samples under load), so
it gets the cores; tokenizing a slice of pairs takes milliseconds, and the tokenizers library's own
thread pool (one thread per core, TOKENIZERS_PARALLELISM) would only compete with the model for them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    CPU limit: torch would otherwise start one thread per core of the whole node)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def tokenize_workers(cores: int) -> int:
    """Tokenize threads beside the model: one on small machines (a second would take a core from the
    model for work that is milliseconds per slice), two from four cores up."""
    return 1 if cores < 4 else 2


def configure_cpu_threads(device: str) -> int:
    """Set the model's intra-op threads to the usable cores (CPU only) and keep the tokenizers library
    single-threaded unless the operator asked otherwise; returns the cores."""
    cores = usable_cores()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        import torch

        if torch.get_num_threads() != cores:
            log.info("model threads: %d (was %d)", cores, torch.get_num_threads())
            torch.set_num_threads(cores)
    return cores
