"""Synthetic clinical notes for local federations, tests and benchmarks (`fedfhe-data`)."""
