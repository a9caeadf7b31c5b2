"""Evaluation: metrics (pycocoevalcap + jiwer), generate-and-score, and the reports."""
