"""The first run outside Django: `make run`/`make demo` report a busy port before any setup, and manage.py reads the
.env that `make run` wrote (so that every README command works without exporting anything)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_a_busy_port_is_reported_before_any_setup(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(["make", "-s", "check-port", f"PORT={port}"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
    assert result.returncode != 0
    assert f"Port {port} on 127.0.0.1 is busy" in result.stdout
    assert f"PORT={port + 1}" in result.stdout
    free = subprocess.run(["make", "-s", "check-port", f"PORT={port}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert free.returncode == 0, free.stdout + free.stderr
    # The check comes first: run and demo depend on it before installing anything.
    plan = subprocess.run(["make", "-n", "run", f"PORT={port}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert plan.stdout.index("s.bind(") < plan.stdout.index("manage.py migrate")


def _probe(tmp_path: Path, *, dot_env: bool, **env: str) -> str:
    """Runs a copy of manage.py with settings that only report whether the .env is to be read."""
    tmp_path.mkdir()
    shutil.copy(ROOT / "manage.py", tmp_path / "manage.py")
    (tmp_path / "probe_settings.py").write_text(
        "import os\nprint('READ=' + os.environ.get('DJANGO_READ_DOT_ENV_FILE', '-'))\n"
        "SECRET_KEY = 'probe'\nINSTALLED_APPS = []\nUSE_TZ = True\n"
    )
    if dot_env:
        (tmp_path / ".env").write_text("DJANGO_SECRET_KEY=from-the-file\n")
    environment = {key: value for key, value in os.environ.items() if key != "DJANGO_READ_DOT_ENV_FILE"}
    environment.update({"DJANGO_SETTINGS_MODULE": "probe_settings", "PYTHONPATH": str(tmp_path), **env})
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_manage_py_reads_the_dot_env_when_there_is_one(tmp_path):
    assert "READ=1" in _probe(tmp_path / "with", dot_env=True)
    assert "READ=-" in _probe(tmp_path / "without", dot_env=False)
    # The environment still decides: 0 ignores the file.
    assert "READ=0" in _probe(tmp_path / "off", dot_env=True, DJANGO_READ_DOT_ENV_FILE="0")
