"""Evaluation: text metrics (metrics.py, bertscore.py), perplexity (perplexity.py), the benchmark
harness (harness.py) and the LLM judge (judge.py)."""
