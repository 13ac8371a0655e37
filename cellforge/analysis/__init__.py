"""Task analysis: the data profile."""
