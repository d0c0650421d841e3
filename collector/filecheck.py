"""The files a collector configuration names, checked as the service will meet them.

``sensormine-collector check-config`` and ``run`` (before it touches a database) check the
configuration file and every file the configuration names (password files, TLS files): that it
exists, is a file, and that the account may read it, judged from the owners and mode bits of the
file and of every directory above it (POSIX ACLs are not read). ``check-config`` judges for the
service's user ``sensormine`` when it exists and the caller is root, else for the caller; ``run``
for itself. For the service's user the unit's sandbox is a warning: it hides home directories
and gives the service a private ``/tmp``. The checks are :mod:`service.files`'s, the agent's too.
"""

from __future__ import annotations

from pathlib import Path

from collector.settings import Settings
from service.files import (
    Account,
    FileChecker,
    FileProblem,
    current_account,
    default_account,
    find_account,
    paths_in,
)

__all__ = [
    "Account",
    "FileProblem",
    "check_files",
    "current_account",
    "default_account",
    "find_account",
]


def check_files(settings: Settings, config_path: Path, account: Account) -> list[FileProblem]:
    """Everything wrong with the configuration file and the files it names, for ``account``."""
    checker = FileChecker(account)
    checker.readable_file("configuration file", str(config_path))
    for key, path in paths_in(settings.model_dump()):
        checker.readable_file(key, str(path))
    return checker.problems
