"""`manage.py create_app --name NAME --mode chat|agent-chat|completion [--key app-...]`: an app and an API key for it,
printed."""
from django.core.management.base import BaseCommand, CommandError

from agentcore.models import AgentApp
from difyapi.services import app_get_or_create_with_key


class Command(BaseCommand):
    help = (
        "Create an agent app (or reuse the one with that name) with a Service API key and print the key. "
        "With --key, that exact key is used, idempotently (for automation)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True, help="App name (unique).")
        parser.add_argument("--mode", required=True, choices=AgentApp.Mode.values)
        parser.add_argument("--key", default=None, help="Use this exact key (app-..., at least 20 characters).")

    def handle(self, *args, name: str, mode: str, key: str | None, **options):
        name = name.strip()
        if not name:
            raise CommandError("--name must not be blank.")
        try:
            app, raw_key, created = app_get_or_create_with_key(name=name, mode=mode, raw_key=key)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        verb = "Created" if created else "Using existing"
        self.stderr.write(f"{verb} app {app.name!r} ({app.mode}, id {app.pk}). API key (shown once):")
        self.stdout.write(raw_key)
