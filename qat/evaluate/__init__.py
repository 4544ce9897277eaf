"""Evaluation: perplexity and KL to a teacher (``perplexity``), per-layer output error and bits
per weight (``diagnostic``), lm-evaluation-harness (``harness``)."""
