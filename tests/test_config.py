"""config.yaml: the shipped file loads, the issue's key names hold, errors name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_node.config import MAX_AUTO_RECEIVERS, ConfigError, load_config
from tests.conftest import REPO


def test_shipped_config_has_the_documented_keys() -> None:
    config = load_config(REPO / "config.yaml", environ={})
    assert (config.node.ae_title, config.node.host, config.node.port) == (
        "RESMTNET",
        "0.0.0.0",
        11112,
    )
    assert config.storage.database_url == "sqlite:///./var/node.db"
    assert config.completion.quiet_seconds == 30
    assert (config.workers.count, config.workers.device) == (1, "auto")
    (pacs,) = config.destinations
    assert (pacs.name, pacs.ae_title, pacs.port) == ("pacs", "PACS", 4242)
    assert pacs.objects == ["sr", "seg", "key_images"]


def test_receiving_processes_default_to_one_per_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for cores, expected in ((1, 1), (2, 2), (16, MAX_AUTO_RECEIVERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert load_config(REPO / "config.yaml", environ={}).node.receivers == expected
        assert load_config(None, environ={}).node.receivers == expected
    path = tmp_path / "config.yaml"
    path.write_text("node:\n  receivers: 3\n")
    assert load_config(path, environ={}).node.receivers == 3


def test_no_file_means_embedded_defaults() -> None:
    config = load_config(None, environ={})
    assert config.storage.database_url.startswith("sqlite:")
    assert config.destinations == []


def test_environment_overrides_file_values() -> None:
    environ = {
        "DICOM_NODE__STORAGE__DATABASE_URL": "postgresql+psycopg://node@db/node",
        "DICOM_NODE__DESTINATIONS__0__PORT": "104",
        "DICOM_NODE__COMPLETION__QUIET_SECONDS": "5",
        "UNRELATED": "x",
    }
    config = load_config(REPO / "config.yaml", environ=environ)
    assert config.storage.database_url == "postgresql+psycopg://node@db/node"
    assert config.destinations[0].port == 104
    assert config.completion.quiet_seconds == 5.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node:\n  prt: 1\n", "node.prt: unknown key"),
        ("node:\n  port: 70000\n", "node.port: Input should be less than or equal to 65535"),
        ("node:\n  ae_title: 'WAY_TOO_LONG_AE_TITLE'\n", "node.ae_title: expected an AE title"),
        ("destinations:\n  - {name: a, objects: [sr, pdf]}\n", "destinations.0.objects.1:"),
        ("destinations:\n  - {name: a}\n  - {name: a}\n", "destination names must be unique"),
        ("selection:\n  series_description_exclude: ['(']\n", "is not a regular expression"),
        ("eligibility:\n  min_slices: -1\n", "eligibility.min_slices: expected a non-negative"),
        ("- a\n- b\n", "expected a mapping of sections"),
        (
            "dashboard:\n  token: hunter2\n",
            "dashboard.token: expected at least 16 characters, got 7 (or",
        ),
        (
            "priors:\n  peers: [{name: p, ae_title: P, host: h, port: 104, retrieve: copy}]\n",
            "priors.peers.0.retrieve: Input should be 'move' or 'get' (got 'copy')",
        ),
    ],
)
def test_wrong_values_are_one_line_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value) and "hunter2" not in str(caught.value)


def test_environment_index_beyond_the_list_is_named() -> None:
    with pytest.raises(ConfigError, match="DICOM_NODE__DESTINATIONS__3__HOST"):
        load_config(REPO / "config.yaml", environ={"DICOM_NODE__DESTINATIONS__3__HOST": "x"})


def test_the_shipped_file_states_the_embedded_defaults_but_its_example_destination() -> None:
    shipped = load_config(REPO / "config.yaml", environ={}).model_dump()
    embedded = load_config(None, environ={}).model_dump()
    assert shipped.pop("destinations") != embedded.pop("destinations")
    assert shipped == embedded
