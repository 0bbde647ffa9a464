#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""
import os
import sys
from pathlib import Path


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "opsagent.settings")
    # The secrets `make run` generated into .env: every command reads them, as the server does (the environment
    # still wins over the file; DJANGO_READ_DOT_ENV_FILE=0 ignores it).
    if (Path(__file__).resolve().parent / ".env").exists():
        os.environ.setdefault("DJANGO_READ_DOT_ENV_FILE", "1")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
