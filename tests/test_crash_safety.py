"""A bounded run of scripts/fault_injection.py: the node's processes SIGKILLed at random while
a modality sends, delivering to Orthanc; nothing acknowledged is lost, nothing duplicated."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.fault_injection import run


@pytest.mark.slow
def test_nothing_acknowledged_is_lost_across_random_kills(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cycles=5, size=40, seed=7, work=tmp_path) == 0, capsys.readouterr().out
    counts = capsys.readouterr().out.splitlines()[-1]
    assert "lost 0" in counts and "duplicated 0" in counts and "stuck jobs 0" in counts
