"""Helpers for the tests, the demo, the benchmark and the chaos run (not part of the library)."""
