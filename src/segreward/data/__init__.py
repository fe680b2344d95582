"""Datasets, label formats and the synthetic domain-shift generator."""
