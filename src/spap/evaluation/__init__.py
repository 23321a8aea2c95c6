"""Evaluation: perplexity, zero-shot multiple choice, speed."""
