"""Baseline training-throughput scripts for the side-by-side benchmark (issue 8); see README.md."""
