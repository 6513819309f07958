"""Recipes: TOML files holding a paper's protocol as command options.

A recipe is a flat table of option names (``backbone = "slowfusion"``,
``lr = 1e-3``; hyphens and underscores are the same) with optional per-command
tables ``[pretrain]``, ``[finetune]``, ``[compare-policies]`` and ``[demo]``
whose values win for that command. Options given on the command line win
over the recipe. A key that no command knows is an error naming it; a
``[demo]`` table may also hold the demo's own settings (the keys of
:data:`vtransfer.demo.DEMO_SETTINGS`).

Relative paths in a recipe (``categories``, ``manifest``, ``split_files``,
``cache_dir``, and ``weights`` when it names a file) are relative to the
recipe file's folder, so a recipe and its categories file travel together.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from vtransfer.utils.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMMAND_TABLES = ("pretrain", "finetune", "compare-policies", "demo")
PATH_KEYS = ("categories", "manifest", "split_files", "cache_dir")
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(values)
    for key, value in values.items():
        is_weight_file = key == "weights" and isinstance(value, str) and value.endswith(_WEIGHT_FILE_SUFFIXES)
        if (key in PATH_KEYS or is_weight_file) and isinstance(value, str) and not Path(value).is_absolute():
            out[key] = str(base / value)
    return out


def _demo_setting_keys() -> set[str]:
    """Keys a ``[demo]`` table may hold besides command options: the demo's own settings."""
    from vtransfer.demo import DEMO_SETTINGS

    return set(DEMO_SETTINGS)


def _norm(key: str) -> str:
    return key.replace("-", "_")


def demo_settings(path: Path) -> dict[str, Any]:
    """The ``[demo]`` table of a recipe, checked against the demo's settings."""
    table = read_recipe(path).get("demo", {})
    known = _demo_setting_keys()
    unknown = sorted(_norm(k) for k in table if _norm(k) not in known)
    if unknown:
        raise ConfigError(f"recipe {path}: unknown key(s) {unknown} in [demo]; known keys: {', '.join(sorted(known))}")
    return {_norm(k): v for k, v in table.items()}


def read_recipe(path: Path) -> dict[str, Any]:
    """Parse a recipe file; syntax errors name the file and line."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"recipe {path}: file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path}: {e}") from e


def recipe_values(path: Path, command: str, command_keys: set[str], all_keys: set[str]) -> dict[str, Any]:
    """Option values a recipe sets for ``command``.

    ``command_keys`` are the option names of ``command``; ``all_keys`` those of
    every command that takes recipes. Top-level keys of other commands are
    ignored here; keys no command knows raise :class:`ConfigError`.
    """
    raw = read_recipe(path)
    values: dict[str, Any] = {}
    tables = {t: raw.get(t, {}) for t in COMMAND_TABLES}
    for key, value in raw.items():
        if key in COMMAND_TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"recipe {path}: [{key}] must be a table")
            continue
        k = _norm(key)
        if k not in all_keys:
            raise ConfigError(f"recipe {path}: unknown key {key!r}; known keys: {', '.join(sorted(all_keys))}")
        if k in command_keys:
            values[k] = value
    for table, entries in tables.items():
        known = all_keys | _demo_setting_keys() if table == "demo" else all_keys
        for key in entries:
            k = _norm(key)
            if k not in known:
                raise ConfigError(f"recipe {path}: unknown key {key!r} in [{table}]; known keys: {', '.join(sorted(all_keys))}")
    section = tables.get(command, {})
    for key, value in section.items():
        k = _norm(key)
        if k not in command_keys:
            raise ConfigError(f"recipe {path}: key {key!r} in [{command}] is not an option of {command}")
        values[k] = value
    return _resolve_paths(values, Path(path).resolve().parent)


def merge_with_cli(ctx, params: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``params`` (Typer-parsed) with recipe ``values`` for every option not given on the command line."""
    # Compared by name: typer may vendor click (typer._click) instead of depending on it.
    merged = dict(params)
    for k, v in values.items():
        source = ctx.get_parameter_source(k)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            merged[k] = v
    return merged
