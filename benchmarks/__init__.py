"""Benchmark data loaders and reference models for qpass."""
