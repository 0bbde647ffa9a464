from django.apps import AppConfig
from django.core import checks
from django.db.models.signals import post_delete, post_save

from agentcore.checks import retired_network_switches


class AgentCoreConfig(AppConfig):
    name = "agentcore"
    verbose_name = "Agent"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from agentcore.models import MCPServer, ToolPolicy
        from agentcore.tools.policies import tool_setup_row_changed

        checks.register(retired_network_switches, checks.Tags.security)
        # Every process reads the tool setup again after a policy row or an MCP server changed.
        for model, uid in ((ToolPolicy, "agentcore.tool_setup.policy"), (MCPServer, "agentcore.tool_setup.server")):
            for signal in (post_save, post_delete):
                signal.connect(tool_setup_row_changed, sender=model, dispatch_uid=uid)
