"""The shipped unit passes `systemd-analyze verify` and carries the hardening it promises."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO, require

UNIT = REPO / "systemd" / "dicom-node@.service"


@pytest.mark.parametrize("role", ["all", "receiver", "worker", "sender"])
def test_unit_verifies_cleanly_for_each_role(tmp_path: Path, role: str) -> None:
    # verify checks that ExecStart exists: point it at this checkout's console script; a
    # template is verified as one of its instances.
    script = Path(sys.executable).with_name("dicom-node")
    unit = tmp_path / f"dicom-node@{role}.service"
    unit.write_text(UNIT.read_text().replace("/opt/dicom-node/.venv/bin/dicom-node", str(script)))
    result = subprocess.run(
        [require("systemd-analyze"), "verify", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_runs_unprivileged_and_hardened() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["User"] == "dicom-node"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/dicom-node -/srv/dicom-node"
    assert service["NoNewPrivileges"] == "yes" and service["PrivateTmp"] == "yes"
    assert service["Restart"] == "on-failure"
    assert (
        service["AmbientCapabilities"] == service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    )
    assert service["ExecStart"].endswith("serve --config /etc/dicom-node/config.yaml --roles %i")
