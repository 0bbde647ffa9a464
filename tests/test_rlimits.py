"""A server process raises its soft limit on open files: 1,000 concurrent streams need over 2,000 descriptors."""
from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from tests.e2e.dify_servers import ROOT, server_env

CHILD = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))
import django
django.setup()
import opsagent.asgi  # noqa: F401  (what daphne and uvicorn import)
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_importing_the_asgi_application_raises_a_low_soft_open_files_limit_to_the_hard_limit():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit leaves nothing to raise")
    env = server_env(database_url="sqlite:///:memory:")
    done = subprocess.run([sys.executable, "-c", CHILD, "256"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = 65536 if hard == resource.RLIM_INFINITY else hard
    assert int(done.stdout.split()[-1]) == expected
