"""Evaluation and reporting: metrics and ranks, the score shared by evaluate and index, the report, run
comparisons and the papers' published numbers."""
