"""opsagent/settings.py declares every setting the code reads (Django's own aside) and restates none of Django's
defaults."""
import ast
import re
from pathlib import Path

from django.conf import global_settings

import opsagent.settings as project_settings

ROOT = Path(__file__).resolve().parent.parent
CODE = ["opsagent", "llmconfigs", "agentcore", "difyapi"]
READ = re.compile(r"""\bsettings\.([A-Z][A-Z0-9_]*)\b|getattr\(\s*settings,\s*["']([A-Z][A-Z0-9_]*)["']""")


def _source_files():
    for package in CODE:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).parts
            if "tests" not in parts and "migrations" not in parts and path.name != "settings.py":
                yield path


def test_every_setting_the_code_reads_is_declared_or_djangos_own():
    read = {name for path in _source_files() for match in READ.finditer(path.read_text())
            for name in match.groups() if name}
    assert read, "the scan found no settings: the pattern or the paths are wrong"
    missing = sorted(name for name in read if not hasattr(project_settings, name) and not hasattr(global_settings,
                                                                                                   name))
    assert not missing, f"read by the code but not declared in opsagent/settings.py: {missing}"


def test_no_setting_restates_a_django_default():
    tree = ast.parse((ROOT / "opsagent" / "settings.py").read_text())
    restated = []
    for node in tree.body:  # top level only: values set inside a branch depend on the environment
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue  # read from the environment or computed: the default only when nothing is set
            if hasattr(global_settings, name) and getattr(global_settings, name) == value:
                restated.append(name)
    assert not restated, f"opsagent/settings.py restates Django's defaults: {restated}"
