"""EngineConfig settings from a config file plus absl flags — shared by ``serve`` and the benchmarks.

Owns: the precedence rule. The file (YAML or JSON, e.g. autotune's best_config.json) comes first; flags
given explicitly on the command line override it; without a file every named flag applies (its
default included).
"""

from __future__ import annotations

from typing import Iterable


def settings_from_flags(flag_values, names: Iterable[str], config_path: str | None = None) -> dict:
    """EngineConfig fields from ``config_path`` (may be None) and the flags ``names`` of ``flag_values``."""
    settings = {}
    if config_path:
        import yaml

        with open(config_path) as f:
            settings = dict(yaml.safe_load(f) or {})  # YAML is a superset of JSON
    for name in names:
        if not config_path or flag_values[name].present:
            settings[name] = getattr(flag_values, name)
    return settings
