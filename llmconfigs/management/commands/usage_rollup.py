"""`manage.py usage_rollup`: roll the recorded provider calls up per hour and day, then delete the rolled-up calls
older than USAGE_RETENTION_DAYS. Run it every few minutes (cron, a systemd timer); overlapping runs are safe."""
from django.conf import settings
from django.core.management.base import BaseCommand

from llmconfigs.usage import usage_prune, usage_rollup


class Command(BaseCommand):
    help = (
        "Add the provider calls not rolled up yet to their hourly and daily usage rollups (each call exactly once, "
        "even when runs overlap), then delete the rolled-up calls older than USAGE_RETENTION_DAYS."
    )

    def add_arguments(self, parser):
        parser.add_argument("--no-prune", action="store_true", help="Only roll up; delete nothing.")

    def handle(self, *args, no_prune: bool = False, **options):
        rolled = usage_rollup()
        deleted = 0 if no_prune else usage_prune()
        self.stdout.write(f"Rolled up {rolled} provider call(s); deleted {deleted} older than "
                          f"{settings.USAGE_RETENTION_DAYS} days.")
