"""Harness code of the integration tests: what the tests stand on, kept out of the test modules."""
