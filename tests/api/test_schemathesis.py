"""Schemathesis against the OpenAPI document: generated requests (valid and invalid, each
operation, and links between them) find no server error and no answer outside the document."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.api.conftest import World

# Cross-parameter rules (start before end, range within api.max_range, a range that fits
# max_points) cannot be said in OpenAPI: a schema-valid request may get a 400 problem detail,
# which positive_data_acceptance would count as a failure. Every other check runs.
EXCLUDED = "positive_data_acceptance"


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    world: World, tmp_path: Path
) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    config = tmp_path / "schemathesis.toml"
    # Ids of the tenant's own gateway and device, so that the generated requests reach the
    # queries behind them (random ids only meet unknown_device).
    config.write_text(
        "[parameters]\n"
        f'"path.device_id" = "{world.fleet.devices[0]}"\n'
        f'"path.gateway_id" = "{world.fleet.gateway}"\n'
        '"query.metric" = "temperature"\n'
    )
    done = subprocess.run(
        [
            st,
            "--config-file",
            str(config),
            "run",
            f"{world.url}/api/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {world.token_a}",
            "--checks",
            "all",
            "--exclude-checks",
            EXCLUDED,
            "--max-examples",
            "25",
            "--generation-deterministic",
            "--request-timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert 0 == done.returncode, done.stdout[-6000:] + done.stderr[-2000:]
    assert "No issues found" in done.stdout
