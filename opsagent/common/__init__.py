"""Shared utilities the apps may import: a leaf package that imports no app (checked by import-linter)."""
