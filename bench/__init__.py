"""Benchmarks for bnfold (not part of the unit tests; see bench/README.md)."""
