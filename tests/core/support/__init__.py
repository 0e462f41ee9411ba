"""Harness code of the core tests: what the tests stand on, kept out of the test modules."""
