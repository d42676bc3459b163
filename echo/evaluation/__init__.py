"""Metrics with confidence intervals, evaluation of a model on a split, and plots."""
