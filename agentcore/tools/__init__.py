"""The agent's tools: built-in ops tools (builtin.py) and the plan tool (plan.py), tool policies (policies.py) and the
tool set of one run (registry.py)."""
