"""`manage.py rotate_field_key --old-key OLD`: re-encrypt every encrypted field from OLD to FIELD_ENCRYPTION_KEY."""
from django.core.management.base import BaseCommand, CommandError

from llmconfigs.errors import KeyRotationRefused
from llmconfigs.rotation import encrypted_fields_rotate_key


class Command(BaseCommand):
    help = (
        "Re-encrypt every encrypted field (LLM API keys, MCP server secrets) from the old FIELD_ENCRYPTION_KEY to the "
        "one now set, in one transaction. Run it right after changing FIELD_ENCRYPTION_KEY, before serving traffic."
    )

    def add_arguments(self, parser):
        parser.add_argument("--old-key", required=True, help="The FIELD_ENCRYPTION_KEY the data is encrypted with now.")

    def handle(self, *args, old_key: str, **options):
        if not old_key:
            raise CommandError("--old-key must not be empty.")
        try:
            counts = encrypted_fields_rotate_key(old_key=old_key)
        except KeyRotationRefused as exc:
            raise CommandError(exc.message) from None
        for label, count in counts.items():
            self.stdout.write(f"{label}: {count} value(s) re-encrypted.")
        self.stdout.write(self.style.SUCCESS("Every encrypted field now uses the current FIELD_ENCRYPTION_KEY."))
