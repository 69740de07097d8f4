"""Fine-tuning a reranker on one's own BEIR-layout data, and choosing score-fusion weights honestly."""
