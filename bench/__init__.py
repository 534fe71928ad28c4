"""Benchmarks (`make bench`): cost per call against the bare gRPC floor, cost as work grows,
and goodput against a simulated provider. Never part of the test command."""
