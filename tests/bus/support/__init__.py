"""Harness code of the bus tests: what the tests stand on, kept out of the test modules."""
