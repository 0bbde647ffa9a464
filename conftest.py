"""Shared pytest fixtures live in tests/fixtures.py so that app tests and cross-app tests use the same ones."""
pytest_plugins = ["tests.fixtures"]
