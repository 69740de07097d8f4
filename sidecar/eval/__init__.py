"""Offline replay evaluator: replays BEIR collections through a first stage and the sidecar, and reports
quality (nDCG@10, MRR@10, MAP@100, recall) and latency together.

A client of the sidecar only: nothing in the server imports this package.
"""
