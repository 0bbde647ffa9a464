"""`manage.py seed`: idempotent first-run data: LLM config from LLM_* variables, provider templates, superuser, the
demo agent app and its first API key, the tool policies; `--demo-upstream URL` adds the demo config of `make demo`,
`--url` prints where to go next (what `make run` shows on the way up)."""
import os

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from agentcore.services import agent_app_seed_demo, message_close_stale
from agentcore.tools.policies import tool_policy_add_builtins
from difyapi.services import dify_seed_demo_key
from llmconfigs.errors import LLMConfigError
from llmconfigs.providers import PROVIDERS
from llmconfigs.selectors import llm_config_list
from llmconfigs.services import llm_config_seed_demo, llm_config_seed_from_env, llm_config_seed_templates


class Command(BaseCommand):
    help = "Create or update the default LLM config from LLM_TYPE/LLM_API_KEY/LLM_MODEL/LLM_BASE_URL, and more."

    def add_arguments(self, parser):
        parser.add_argument("--templates", action="store_true", help="Also create inactive keyless provider templates.")
        parser.add_argument("--demo-upstream", metavar="URL", default="",
                            help="Add the demo config: an OpenAI-compatible fake at URL (make demo starts one).")
        parser.add_argument("--url", default="", help="Where the server will listen: print the next steps for it.")

    def handle(self, *args, **options):
        self._seed_llm_config()
        if options["templates"]:
            created = llm_config_seed_templates()
            self.stdout.write(f"Provider templates: {len(created)} created.")
        if options["demo_upstream"]:
            config, is_default = llm_config_seed_demo(base_url=options["demo_upstream"])
            self.stdout.write(f"Demo config {config.name!r} answers from the fake upstream at {config.base_url}"
                              f"{' (the default model)' if is_default else ' (pick it in the chat page)'}.")
        # The tool policies exist from the start, so that the admin can switch a tool (e.g. run_shell) on at once.
        tool_policy_add_builtins()
        self._seed_superuser()
        key = self._seed_demo_app()
        closed = message_close_stale()
        if closed:
            self.stdout.write(f"Closed {closed} answer(s) left running by a server that stopped.")
        if options["url"]:
            self._next_steps(options["url"].rstrip("/"), key)

    def _seed_demo_app(self) -> str:
        app = agent_app_seed_demo()
        key = dify_seed_demo_key(app=app)
        if key:
            self.stdout.write(
                f"Created an API key for app {app.name!r} ({app.mode}). It is shown only now; keep it:\n"
                f"    {key}"
            )
        else:
            self.stdout.write(f"App {app.name!r} has an API key (create more in the admin or with create_app).")
        return key or ""

    def _next_steps(self, url: str, key: str) -> None:
        """What to do once the server is up: where to chat, and whether a model is there to answer."""
        lines = ["", "Next steps:", f"  Chat in the browser: {url}/  (sign in with the admin user)"]
        if key:
            lines.append(
                f"  Try the Dify API: curl -N -X POST {url}/v1/chat-messages -H 'Authorization: Bearer {key}' "
                "-H 'Content-Type: application/json' -d '{\"inputs\": {}, \"query\": \"What time is it?\", "
                "\"user\": \"me\", \"response_mode\": \"streaming\"}'"
            )
        if not llm_config_list(is_active=True, is_embedding=False).exists():
            lines += [
                "  No model is configured yet, so chats cannot be answered. Either:",
                f"    - add one in the admin ({url}/admin/llmconfigs/llmconfig/add/), or activate a provider template"
                " there after adding its key;",
                "    - or set LLM_TYPE, LLM_API_KEY (and LLM_MODEL) in .env and run make run again;",
                "    - or try the demo without any key: make demo (a fake model that answers with canned text).",
            ]
        self.stdout.write("\n".join(lines))

    def _seed_llm_config(self) -> None:
        provider = os.environ.get("LLM_TYPE", "").strip().lower()
        if not provider:
            self.stdout.write("LLM_TYPE is not set: no LLM config was seeded (add one in the admin).")
            return
        if provider not in PROVIDERS:
            raise CommandError(f"LLM_TYPE={provider!r} is not a known provider: {', '.join(PROVIDERS)}")
        try:
            config, created = llm_config_seed_from_env(
                provider=provider,
                api_key=os.environ.get("LLM_API_KEY", ""),
                model=os.environ.get("LLM_MODEL", ""),
                base_url=os.environ.get("LLM_BASE_URL", ""),
            )
        except LLMConfigError as exc:
            raise CommandError(exc.message) from None
        except Exception as exc:  # ValidationError from full_clean
            messages = getattr(exc, "message_dict", None) or {"": [str(exc)]}
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in messages.items())) from None
        verb = "Created" if created else "Updated"
        self.stdout.write(f"{verb} default LLM config {config.name!r} ({config.provider}/{config.model_name}).")

    def _seed_superuser(self) -> None:
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME", "").strip()
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD", "")
        if not username or not password:
            return
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            self.stdout.write(f"Superuser {username!r} exists (first password: DJANGO_SUPERUSER_PASSWORD"
                              f"{' in .env' if os.environ.get('DJANGO_READ_DOT_ENV_FILE') else ''}).")
            return
        User.objects.create_superuser(
            username=username, email=os.environ.get("DJANGO_SUPERUSER_EMAIL", ""), password=password
        )
        # Shown once, on the run that created the user (the password was generated into .env by make run).
        self.stdout.write(
            f"Created superuser {username!r} with password {password!r} "
            f"(DJANGO_SUPERUSER_PASSWORD{' in .env' if os.environ.get('DJANGO_READ_DOT_ENV_FILE') else ''}; "
            "change it in the admin)."
        )
