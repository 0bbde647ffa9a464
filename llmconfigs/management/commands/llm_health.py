"""`manage.py llm_health [--all]`: test every active LLM config (or every config) in parallel and print a table."""
from concurrent.futures import ThreadPoolExecutor

from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from llmconfigs.models import LLMConfig
from llmconfigs.routing import health_of
from llmconfigs.selectors import llm_config_get
from llmconfigs.services import llm_config_test_connection

MAX_PARALLEL = 8


def _tested(config: LLMConfig):
    try:
        return llm_config_test_connection(config=config, source="command")
    finally:
        connections.close_all()  # this thread's connection


class Command(BaseCommand):
    help = (
        "Run the connection test (one minimal call, LLM_CONNECTION_TEST_TIMEOUT, no retries) of every active config, "
        "or of every config with --all, in parallel; print each one's result and health. A successful test brings a "
        "config marked auth_failed back into its pool. Exits with status 1 when any test failed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--all", action="store_true", dest="include_inactive", help="Inactive configs too.")

    def handle(self, *args, include_inactive: bool = False, **options):
        configs = list(LLMConfig.objects.all() if include_inactive else LLMConfig.objects.filter(is_active=True))
        if not configs:
            self.stdout.write("No LLM config to test.")
            return
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(configs))) as pool:
            results = list(pool.map(_tested, configs))
        rows = [("NAME", "ROUTE", "RESULT", "LATENCY", "HEALTH", "ERROR")]
        for config, result in zip(configs, results, strict=True):
            fresh = llm_config_get(config_id=config.pk) or config
            health = health_of(fresh)
            error = f"{result.category}: {result.message}" if not result.ok else ""
            rows.append((config.name, config.route_name, "ok" if result.ok else "FAILED", f"{result.latency_ms:.0f} ms",
                         health["state"], error[:100]))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
            self.stdout.write("  ".join([*cells, row[-1]]))
        failed = sum(not result.ok for result in results)
        if failed:
            raise CommandError(f"{failed} of {len(results)} connection test(s) failed.")
        self.stdout.write(self.style.SUCCESS(f"All {len(results)} connection test(s) passed."))
