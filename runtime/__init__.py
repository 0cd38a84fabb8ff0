"""Executors for compiled models, importable as `qpass.runtime`."""
