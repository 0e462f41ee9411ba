"""Harness code of the cli tests: what the tests stand on, kept out of the test modules."""
