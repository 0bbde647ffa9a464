"""System checks of the agent's deployment settings."""
from __future__ import annotations

import os

from django.core import checks

# Deployment-wide switches that opened private networks to every app's end users; each app's network allow-list
# replaced them (docs/security.md, "Network reach of tools").
RETIRED_NETWORK_SWITCHES = ("AGENT_HTTP_CHECK_ALLOW_PRIVATE", "REMOTE_FILES_ALLOW_PRIVATE")


def retired_network_switches(app_configs, **kwargs) -> list[checks.CheckMessage]:
    return [
        checks.Warning(
            f"{name} is set but no longer read: loopback and private targets are opened per app.",
            hint="List the hosts, networks and ports an app may reach in its network allow-list (admin: Agent apps).",
            id="agentcore.W001",
        )
        for name in RETIRED_NETWORK_SWITCHES
        if name in os.environ
    ]
