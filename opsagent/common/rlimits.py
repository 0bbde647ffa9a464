"""Process limits a server needs for many concurrent streams."""
from __future__ import annotations

import resource

# When the hard limit is unlimited: far above what one worker's sockets need, low enough for tools that loop over
# every possible descriptor.
UNLIMITED_SOFT = 65536


def open_files_limit_raise() -> int:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) to its hard limit and return it. Every streamed
    answer holds two sockets (the client's and the provider's) and sometimes a database connection: under a soft
    limit of 1,024, common by default, a worker fails at about 500 concurrent streams (accept and connect get EMFILE).
    Raising the soft limit up to the hard one needs no privilege."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = UNLIMITED_SOFT if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # a platform that refuses: keep the limit the process was started with
    return soft
