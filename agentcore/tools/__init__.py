"""The agent's tools: built-in ops tools (builtin.py), policies and per-run tool sets (registry.py)."""
