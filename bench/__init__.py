"""Benchmarks for issue 7: run by hand, each prints a table (see BENCHMARKS.md)."""
