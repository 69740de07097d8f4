"""Scorer backends behind one call: `Scorer.score(pairs) -> floats`."""

from sidecar.scoring.base import Measure, Pair, Scorer

__all__ = ["Measure", "Pair", "Scorer"]
