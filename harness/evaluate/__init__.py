"""Evaluators: perplexity, memory (and later zero-shot, latency)."""
