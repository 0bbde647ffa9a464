"""The import contract of pyproject.toml ([tool.importlinter]) holds: the app layers, opsagent.common as a leaf, no
app importing the project shell, agentcore's tool modules below its services (no import cycle). Run here so that CI
checks it with the suite (`make lint` runs it too)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_are_kept():
    # A process of its own: import-linter reads the source, and this process's imported modules must not matter.
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                               "sys.exit(lint_imports_command())", "--no-cache", "--no-logo"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout
