"""Evaluation: the card's benchmarks, a sandbox for generated code, pass@k, the report."""
