"""Example servers that ship with OpsAgent."""
