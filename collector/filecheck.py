"""The files a collector configuration names, checked as the service will meet them.

``sensormine-collector check-config`` and ``run`` (before it touches a database) check the
configuration file and every file the configuration names (password files, TLS files): that it
exists, is a file, and that the account may read it, judged from the owners and mode bits of the
file and of every directory above it (POSIX ACLs are not read). ``check-config`` judges for the
service's user ``sensormine`` when it exists and the caller is root, else for the caller; ``run``
for itself. For the service's user the unit's sandbox is a warning: it hides home directories
and gives the service a private ``/tmp``. (The agent has its own, larger version of this:
the two sides share no code but the protocol.)
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from collector.settings import Settings

SERVICE_USER = "sensormine"
_HIDDEN = (Path("/home"), Path("/root"), Path("/run/user"))  # ProtectHome=yes
_PRIVATE = (Path("/tmp"), Path("/var/tmp"))  # PrivateTmp=yes


@dataclass(frozen=True)
class Account:
    """Whom access is judged for."""

    name: str
    uid: int
    gids: frozenset[int]


@dataclass(frozen=True)
class FileProblem:
    """One finding: the configuration key, the path and what is wrong."""

    severity: Literal["error", "warning"]
    key: str
    path: str
    message: str

    def __str__(self) -> str:
        """``key: path: message``."""
        return f"{self.key}: {self.path}: {self.message}"


def find_account(name: str) -> Account | None:
    """The account ``name`` with its groups, or ``None``."""
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        return None
    gids = {user.pw_gid, *(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)}
    return Account(name, user.pw_uid, frozenset(gids))


def current_account() -> Account:
    """The account this process runs as."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return Account(name, uid, frozenset({os.getegid(), *os.getgroups()}))


def default_account() -> Account:
    """The service's user when it exists and the caller is root, else the caller."""
    if os.geteuid() == 0:
        service = find_account(SERVICE_USER)
        if service is not None:
            return service
    return current_account()


def _may_read(st: os.stat_result, account: Account, bits: int) -> bool:
    if account.uid == 0:
        return True
    if st.st_uid == account.uid:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid in account.gids:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group} {stat.S_IMODE(st.st_mode):04o}"


def _problem(path: Path, account: Account) -> str | None:
    """Why ``account`` cannot read the file at ``path``, or ``None``."""
    real = Path(os.path.abspath(path))
    for directory in reversed(real.parents):
        try:
            st = directory.stat()
        except OSError:
            break
        if not _may_read(st, account, 1):
            return f"{account.name} cannot enter {directory} ({_owner(st)})"
    try:
        st = real.stat()
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be checked: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not _may_read(st, account, 4):
        return f"{account.name} cannot read it ({_owner(st)})"
    return None


def _paths_of(value: Any, key: str) -> list[tuple[str, Path]]:
    if isinstance(value, Path):
        return [(key, value)]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _paths_of(v, f"{key}.{k}" if key else k)]
    return []


def check_files(settings: Settings, config_path: Path, account: Account) -> list[FileProblem]:
    """Everything wrong with the configuration file and the files it names, for ``account``."""
    problems: list[FileProblem] = []
    named = [("configuration file", config_path), *_paths_of(settings.model_dump(), "")]
    for key, path in named:
        if account.name == SERVICE_USER and path.is_absolute():
            if any(path.is_relative_to(p) for p in _HIDDEN):
                problems.append(
                    FileProblem(
                        "warning",
                        key,
                        str(path),
                        "the unit hides home directories (ProtectHome=yes)",
                    )
                )
            elif any(path.is_relative_to(p) for p in _PRIVATE):
                problems.append(
                    FileProblem(
                        "warning",
                        key,
                        str(path),
                        "the unit gives the service a private /tmp (PrivateTmp=yes)",
                    )
                )
        message = _problem(path, account)
        if message is not None:
            problems.append(FileProblem("error", key, str(path), message))
    return problems
