"""Evaluation of (compressed) models: token perplexity by the papers' protocol, zero-shot through lm-eval."""
