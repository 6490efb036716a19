"""``config.yaml``: read, checked key by key, with a one-line error naming what is wrong."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from dicom_node.series import EligibilityRules


class ConfigError(ValueError):
    """A wrong key or value; the message names the key and what was expected."""


def _section(data: dict[str, Any], name: str, cls: type) -> dict[str, Any]:
    raw = data.get(name) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of settings, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"{name}.{key}: unknown key; expected one of {', '.join(sorted(known))}"
            )
        default = getattr(cls(), key)
        if (
            isinstance(default, int | float)
            and not isinstance(value, bool)
            and isinstance(value, int | float)
        ):
            if value < 0:
                raise ConfigError(f"{name}.{key}: expected a non-negative number, got {value}")
            out[key] = type(default)(value)
        else:
            raise ConfigError(f"{name}.{key}: expected a number, got {value!r}")
    return out


def load_eligibility(path: Path | None) -> EligibilityRules:
    """The ``eligibility`` section; defaults where the file or the key is absent."""
    if path is None:
        return EligibilityRules()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return EligibilityRules(**_section(data, "eligibility", EligibilityRules))
