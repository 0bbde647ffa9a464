"""The agent's REST API (DRF): chat, sessions, tools, approvals, MCP servers and runs."""
