"""Evaluation: pseudobulk metrics, DE genes and baselines, all computed on the host."""
