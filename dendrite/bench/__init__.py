"""Benchmarks (``python -m dendrite bench ...``): programs that print a table and a JSON line."""
