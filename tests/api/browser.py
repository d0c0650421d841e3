"""The page tests' browser: scripts/chromium.py (shared with ``make demo``'s screenshots)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "chromium.py"
_spec = importlib.util.spec_from_file_location("sensormine_chromium", _PATH)
assert _spec is not None and _spec.loader is not None
chromium = importlib.util.module_from_spec(_spec)
sys.modules["sensormine_chromium"] = chromium
_spec.loader.exec_module(chromium)

dump_dom = chromium.dump_dom
screenshot = chromium.screenshot
