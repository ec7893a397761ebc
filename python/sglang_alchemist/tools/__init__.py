"""Helpers shared by tests, benchmarks and scripts (not used by the server itself)."""
