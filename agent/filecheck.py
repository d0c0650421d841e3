"""The files and directories an agent configuration names, checked as the service will meet them.

``sensormine-agent check-config`` runs these checks after the configuration validates: the
configuration file itself, the buffer's directory (which the agent must be able to write), the
password and TLS files, and what each input names (the program of a ``command`` input, its
working directory, a serial port, sysfs files). Access is judged for one account, by default the
service's own user ``sensormine`` when it exists and the caller is root (``sudo sensormine-agent
check-config``), else the caller: from the owners and mode bits of the file and of every
directory above it, with the unit's supplementary group ``dialout``. POSIX ACLs are not read.
For the service's account the main effects of the unit's sandbox are warnings: only
``/var/lib/sensormine`` is writable, home directories are hidden, ``/tmp`` is private.

With ``root`` (the installer's ``--root``), the paths of the configuration are taken as paths of
the system image under that directory, and the account comes from its ``etc/passwd``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.inputs.base import NamedPath
from agent.settings import Settings, input_label
from service import files
from service.files import (
    EXEC,
    READ,
    WRITE,
    Account,
    FileChecker,
    FileProblem,
    paths_in,
)

# The unit's SupplementaryGroups= (serial ports).
SERVICE_GROUPS = ("dialout",)
# The unit's StateDirectory=: under ProtectSystem=strict the only place the service may write.
STATE_DIRECTORY = Path("/var/lib/sensormine")


def find_account(name: str, root: Path = Path("/")) -> Account | None:
    """The account ``name`` of the system under ``root``, with the agent unit's groups."""
    return files.find_account(name, root, SERVICE_GROUPS)


def default_account(root: Path = Path("/")) -> Account:
    """The service's user when it exists and the caller is root, else the caller."""
    return files.default_account(root, SERVICE_GROUPS)


class _AgentChecker(FileChecker):
    def buffer(self, key: str, path: Path) -> None:
        text = str(path)
        directory = path.parent
        real = self.located(str(directory))
        if (
            self.account.service
            and directory.is_absolute()
            and not directory.is_relative_to(STATE_DIRECTORY)
        ):
            self.add(
                "warning",
                key,
                text,
                f"the unit lets the service write only to {STATE_DIRECTORY}"
                f" (ProtectSystem=strict): add ReadWritePaths={directory} in a drop-in"
                " (systemctl edit sensormine-agent)",
            )
        if not real.exists():
            if self.account.service and directory == STATE_DIRECTORY:
                return  # the unit's StateDirectory= makes it at start
            existing = next(p for p in real.parents if p.exists())
            above = existing.stat()
            if not (stat.S_ISDIR(above.st_mode) and self.permits(above, WRITE | EXEC)):
                self.add(
                    "error",
                    key,
                    text,
                    f"its directory does not exist and {self.account.name} cannot create it in"
                    f" {self.shown(existing)} ({self.describe(above)})",
                )
            return
        st = self.stat_of(key, text, real, True)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.add("error", key, text, f"{directory} is not a directory")
            return
        if not self.permits(st, WRITE | EXEC):
            self.add(
                "error",
                key,
                text,
                f"{self.account.name} cannot create files in {directory} ({self.describe(st)});"
                " SQLite writes the buffer, its -wal and -shm files there",
            )
            return
        for suffix in ("", "-wal", "-shm", ".reserve"):
            file = self.located(text + suffix)
            try:
                fst = file.stat()
            except OSError:
                continue
            if not self.permits(fst, READ | WRITE):
                self.add(
                    "error",
                    key,
                    text + suffix,
                    f"{self.account.name} cannot read and write it ({self.describe(fst)})",
                )


def check_files(
    settings: Settings,
    config_path: Path,
    account: Account,
    root: Path = Path("/"),
) -> list[FileProblem]:
    """Everything wrong with the files and directories of the configuration, for ``account``."""
    checker = _AgentChecker(account, root)
    config = Path(os.path.abspath(config_path))
    checker.readable_file("configuration file", checker.shown(config), real=config)
    for key, path in paths_in(settings.model_dump(exclude={"inputs"})):
        if key == "buffer.path":
            checker.buffer(key, path)
        else:
            checker.readable_file(key, str(path))
    for i, config_input in enumerate(settings.inputs):
        label = input_label(i, config_input.name)
        for named in config_input.named_paths():
            _check_named(checker, f"{label}.{named.key}", named)
    return checker.problems


def _check_named(checker: _AgentChecker, key: str, named: NamedPath) -> None:
    if named.use == "read":
        checker.readable_file(key, named.path, named.present)
    elif named.use == "directory":
        checker.directory(key, named.path)
    elif named.use == "device":
        checker.device(key, named.path, named.present)
    else:
        checker.program(key, named.path, named.search_path)
