"""The layering the folder names promise: the engine knows no DICOM networking or database,
storage knows neither the node nor the engine, and the run time carries none of the lab."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def _modules_after_import(module: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``module`` (and nothing else)."""
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(run.stdout.split())


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("inference.detector", ("dicom_node", "storage", "pynetdicom", "sqlalchemy", "pydicom")),
        ("inference.lab.training", ("dicom_node", "storage", "pynetdicom", "sqlalchemy")),
        ("storage.queue", ("dicom_node", "inference", "pynetdicom", "torch")),
        ("storage.index", ("dicom_node", "inference", "pynetdicom", "torch")),
        ("dicom_node.node", ("dicom_node.lab", "inference.lab")),
        ("dicom_node.analyze", ("dicom_node.lab", "inference.lab", "sqlalchemy", "pynetdicom")),
        ("dicom_node.cli", ("torch", "pynetdicom", "sqlalchemy")),
    ],
)
def test_a_package_imports_nothing_beyond_its_layer(
    module: str, forbidden: tuple[str, ...]
) -> None:
    reached = sorted(
        m
        for m in _modules_after_import(module)
        if any(m == f or m.startswith(f + ".") for f in forbidden)
    )
    assert reached == []
