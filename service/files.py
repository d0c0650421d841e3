"""Files a configuration names, checked as the systemd service will meet them.

Access is judged for one :class:`Account` (by default the service's own user ``sensormine`` when
it exists and the caller is root, else the caller) from the owners and mode bits of the file and
of every directory above it; POSIX ACLs are not read. For the service's account the main effects
of the units' sandbox are warnings: home directories are hidden (``ProtectHome=yes``), ``/tmp``
is private (``PrivateTmp=yes``). With ``root`` (an installer's ``--root``), the paths are taken
as paths of the system image under that directory, and accounts come from its ``etc/passwd``.
Each program adds what only it has (the agent: its buffer directory and its inputs' files).
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SERVICE_USER = "sensormine"
# What systemd gives a service as PATH (systemd.exec(5), "Environment variables").
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_HIDDEN = (Path("/home"), Path("/root"), Path("/run/user"))  # ProtectHome=yes
_PRIVATE = (Path("/tmp"), Path("/var/tmp"))  # PrivateTmp=yes

READ, WRITE, EXEC = 4, 2, 1
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Account:
    """Whom access is judged for: a user, its groups, and whether the unit's sandbox applies."""

    name: str
    uid: int
    gids: frozenset[int]
    service: bool = False


@dataclass(frozen=True)
class FileProblem:
    """One finding: the configuration key, the path as written, and what is wrong."""

    severity: Severity
    key: str
    path: str
    message: str

    def __str__(self) -> str:
        """``key: path: message``, as check-config prints it."""
        return f"{self.key}: {self.path}: {self.message}"


def _entries(root: Path, name: str) -> list[list[str]]:
    try:
        text = (root / "etc" / name).read_text(encoding="utf-8")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def find_account(
    name: str, root: Path = Path("/"), service_groups: tuple[str, ...] = ()
) -> Account | None:
    """The account ``name`` of the system under ``root`` with its groups, or ``None``; the
    service's user also gets ``service_groups`` (the unit's ``SupplementaryGroups=``)."""
    user = next((u for u in _entries(root, "passwd") if len(u) >= 4 and u[0] == name), None)
    if user is None:
        return None
    gids = {int(user[3])}
    for group in _entries(root, "group"):
        if len(group) < 4:
            continue
        members = group[3].split(",")
        if name in members or (name == SERVICE_USER and group[0] in service_groups):
            gids.add(int(group[2]))
    return Account(name, int(user[2]), frozenset(gids), service=name == SERVICE_USER)


def current_account() -> Account:
    """The account this process runs as."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return Account(
        name, uid, frozenset({os.getegid(), *os.getgroups()}), service=name == SERVICE_USER
    )


def default_account(root: Path = Path("/"), service_groups: tuple[str, ...] = ()) -> Account:
    """The service's user when it exists and the caller is root, else the caller."""
    if os.geteuid() == 0:
        service = find_account(SERVICE_USER, root, service_groups)
        if service is not None:
            return service
    return current_account()


class FileChecker:
    """Checks paths as ``account`` will meet them on the system under ``root``; collects
    :class:`FileProblem` s in ``problems``."""

    def __init__(self, account: Account, root: Path = Path("/")) -> None:
        self.account = account
        self.root = Path(os.path.abspath(root))
        self.problems: list[FileProblem] = []
        self._users = {0: "root"} | {
            int(u[2]): u[0] for u in _entries(root, "passwd") if len(u) >= 3
        }
        self._groups = {0: "root"} | {
            int(g[2]): g[0] for g in _entries(root, "group") if len(g) >= 3
        }

    # -- helpers ------------------------------------------------------------------------------
    def add(self, severity: Severity, key: str, path: str, message: str) -> None:
        self.problems.append(FileProblem(severity, key, path, message))

    def located(self, text: str) -> Path:
        """Where a path of the configuration is on this machine."""
        path = Path(text)
        # A path already inside the image names that file itself (an agent run in place).
        if path.is_absolute() and self.root != Path("/") and not path.is_relative_to(self.root):
            return self.root / path.relative_to("/")
        return path

    def shown(self, real: Path) -> str:
        """A path of this machine as the target system names it."""
        if self.root != Path("/") and real.is_relative_to(self.root):
            return "/" + str(real.relative_to(self.root))
        return str(real)

    def describe(self, st: os.stat_result) -> str:
        user = self._users.get(st.st_uid, str(st.st_uid))
        group = self._groups.get(st.st_gid, str(st.st_gid))
        return f"{user}:{group} {stat.S_IMODE(st.st_mode):04o}"

    def permits(self, st: os.stat_result, want: int) -> bool:
        account = self.account
        if account.uid == 0:
            return not want & EXEC or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
        if st.st_uid == account.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in account.gids:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want

    def blocked_at(self, real: Path) -> str | None:
        """Why the account cannot reach ``real`` (a directory above it it may not enter)."""
        top = self.root if real.is_relative_to(self.root) else Path("/")
        for directory in reversed(real.parents):
            if directory != top and not directory.is_relative_to(top):
                continue
            try:
                st = directory.stat()
            except OSError:
                return None  # the missing part is reported by the caller
            if not self.permits(st, EXEC):
                return (
                    f"{self.account.name} cannot enter {self.shown(directory)}"
                    f" ({self.describe(st)})"
                )
        return None

    def sandbox(self, key: str, text: str, path: Path) -> None:
        if not self.account.service or not path.is_absolute():
            return
        if any(path.is_relative_to(p) for p in _HIDDEN):
            self.add("warning", key, text, "the unit hides home directories (ProtectHome=yes)")
        elif any(path.is_relative_to(p) for p in _PRIVATE):
            self.add(
                "warning", key, text, "the unit gives the service a private /tmp (PrivateTmp=yes)"
            )

    def stat_of(self, key: str, text: str, real: Path, present: bool) -> os.stat_result | None:
        """The file's status, or ``None`` after reporting why there is none to check."""
        try:
            st = real.stat()
        except FileNotFoundError:
            if present:
                self.add("error", key, text, "does not exist")
            else:
                self.add(
                    "warning", key, text, "does not exist now (expected to appear at run time?)"
                )
            return None
        except OSError as exc:
            self.add("error", key, text, f"cannot be checked: {exc.strerror}")
            return None
        blocked = self.blocked_at(real)
        if blocked:
            self.add("error", key, text, blocked)
            return None
        return st

    # -- what a path is for -------------------------------------------------------------------
    def readable_file(
        self, key: str, text: str, present: bool = True, real: Path | None = None
    ) -> None:
        self.sandbox(key, text, Path(text))
        real = self.located(text) if real is None else real
        st = self.stat_of(key, text, real, present)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            self.add("error", key, text, "is a directory, not a file")
        elif not self.permits(st, READ):
            self.add(
                "error", key, text, f"{self.account.name} cannot read it ({self.describe(st)})"
            )

    def directory(self, key: str, text: str) -> None:
        self.sandbox(key, text, Path(text))
        st = self.stat_of(key, text, self.located(text), True)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.add("error", key, text, "is not a directory")
        elif not self.permits(st, READ | EXEC):
            self.add(
                "error", key, text, f"{self.account.name} cannot list it ({self.describe(st)})"
            )

    def device(self, key: str, text: str, present: bool) -> None:
        st = self.stat_of(key, text, self.located(text), present)
        if st is None:
            return
        if not stat.S_ISCHR(st.st_mode):
            self.add("warning", key, text, "is not a character device (a serial port?)")
        if not self.permits(st, READ | WRITE):
            self.add(
                "error",
                key,
                text,
                f"{self.account.name} cannot open it for reading and writing ({self.describe(st)})",
            )

    def program(self, key: str, text: str, search_path: str | None) -> None:
        if "/" in text:
            self.executable(key, text, text)
            return
        directories = (search_path or SERVICE_PATH).split(":")
        for directory in directories:
            candidate = self.located(f"{directory.rstrip('/')}/{text}")
            try:
                st = candidate.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                self.executable(key, text, self.shown(candidate))
                return
        self.add(
            "error",
            key,
            text,
            f"no such program in the service's PATH ({':'.join(directories)}); write its full path",
        )

    def executable(self, key: str, text: str, target: str) -> None:
        self.sandbox(key, text, Path(target))
        real = self.located(target)
        st = self.stat_of(key, text, real, True)
        if st is None:
            return
        if not stat.S_ISREG(st.st_mode):
            self.add("error", key, text, "is not a file")
            return
        want = EXEC
        try:
            with real.open("rb") as f:
                if f.read(2) == b"#!":
                    want |= READ  # a script is read by its interpreter
        except OSError:
            pass
        if not self.permits(st, want):
            self.add("error", key, text, f"{self.account.name} cannot run it ({self.describe(st)})")


def paths_in(value: Any, key: str = "") -> list[tuple[str, Path]]:
    """Every path value of a (dumped) settings tree, with its dotted key."""
    if isinstance(value, Path):
        return [(key, value)]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in paths_in(v, f"{key}.{k}" if key else k)]
    return []
