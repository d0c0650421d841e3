"""The distribution's extras: the core (what a gateway installs) is exactly what the protocol and
the agent import, and the collector's own dependencies are only in the ``collector`` extra."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from collector.launch import COLLECTOR_MODULES
from tests.ops.units import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

# Imported by structlog when installed (prettier console tracebacks), never needed: a
# development environment has rich (schemathesis needs it), a gateway does not.
OPTIONAL_FOR_STRUCTLOG = ("rich",)

# Imports every module of the agent and the protocol with the collector's dependencies made
# unimportable, then prints the distributions of the third-party modules that got loaded.
_IMPORT_AGENT = """
import importlib, importlib.abc, importlib.metadata, json, pkgutil, sys
blocked = set(sys.argv[1].split(","))
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} belongs to the collector extra")
        return None
sys.meta_path.insert(0, Blocked())
before = set(sys.modules)  # what site.py loaded (a .pth hook of setuptools) is not ours
import agent, protocol
for package in (agent, protocol):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.endswith(".__main__"):
            importlib.import_module(info.name)
owners = importlib.metadata.packages_distributions()
loaded = {name.split(".")[0] for name in set(sys.modules) - before}
print(json.dumps(sorted({d for m in loaded for d in owners.get(m, [])})))
"""


def closure(requirements: list[str], extras: frozenset[str] = frozenset()) -> set[str]:
    """Canonical names of the distributions ``requirements`` pull in, transitively, as
    installed in this environment (markers evaluated for this interpreter)."""
    found: set[str] = set()
    todo = [(Requirement(text), extras) for text in requirements]
    while todo:
        req, wanted = todo.pop()
        if req.marker is not None and not any(
            req.marker.evaluate({"extra": extra}) for extra in (*wanted, "")
        ):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        found.add(name)
        for text in importlib.metadata.requires(req.name) or []:
            todo.append((Requirement(text), frozenset(req.extras)))
    return found


def test_agent_imports_nothing_of_the_collector_extra() -> None:
    """Every module of the agent and the protocol imports with the collector's dependencies
    missing, and every third-party distribution it loads is in the core dependencies."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _IMPORT_AGENT,
            ",".join([*COLLECTOR_MODULES, *OPTIONAL_FOR_STRUCTLOG]),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=120,
    )
    assert 0 == result.returncode, result.stderr
    loaded = {canonicalize_name(d) for d in json.loads(result.stdout)} - {"sensormine"}
    core = closure(PROJECT["dependencies"])
    assert set() == loaded - core
    assert {"asyncpg", "jsonschema", "cryptography"}.isdisjoint(core)


def test_collector_extra_is_what_the_launcher_checks() -> None:
    """The ``collector`` extra and the modules ``sensormine-collector`` checks for before it
    starts are the same list; the ``agent`` extra adds nothing to the core."""
    extras = PROJECT["optional-dependencies"]
    assert {canonicalize_name(d) for d in COLLECTOR_MODULES.values()} == {
        canonicalize_name(Requirement(text).name) for text in extras["collector"]
    }
    assert [] == extras["agent"]
    assert "collector.launch:main" == PROJECT["scripts"]["sensormine-collector"]


def test_collector_launcher_names_the_missing_extra() -> None:
    """On an installation without the collector extra, ``sensormine-collector`` says what to
    install instead of a traceback."""
    blocker = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, p=None: None if n in ('asyncpg', 'cryptography') else real(n, p)\n"
        "from collector.launch import main\n"
        "sys.argv = ['sensormine-collector', '--help']\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert (1, "") == (result.returncode, result.stdout)
    assert (
        "error: this installation has the agent only: the collector also needs asyncpg,"
        " cryptography. Install it with: pip install 'sensormine[collector]' (in a checkout:"
        " pip install '.[collector]')\n"
    ) == result.stderr
