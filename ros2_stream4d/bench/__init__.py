"""Benchmarks: per-frame time and memory, per-stage timing."""
