"""The training commands' options, generated from the run configuration's declarations.

Every option of ``finetune``, ``pretrain`` and ``compare-policies`` that sets a
run option is declared once, as a field of :mod:`vtransfer.run_config` (type,
default, help text, panel). :func:`run_option` turns one field into the
``Annotated`` type Typer reads; :func:`with_run_options` gives a command every
run option at once, so the commands cannot drift apart; :func:`run_values`
turns the parsed command line back into the configuration's names and types.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Any, Callable, Optional

import typer

from vtransfer.run_config import FIELDS, SECTIONS


def _cli_name(name: str) -> str:
    return FIELDS[name][1].metadata.get("cli_name") or name


def _cli_type(name: str) -> Any:
    section, f = FIELDS[name]
    meta = f.metadata
    if meta.get("cli_type") is not None:
        return meta["cli_type"]
    hint = typing.get_type_hints(SECTIONS[section])[name]
    return hint


def run_option(name: str) -> Any:
    """The ``Annotated[type, typer.Option(...)]`` of run option ``name`` (flag ``--name-with-hyphens``; ``--no-...`` too
    for a switch that is on by default)."""
    meta = FIELDS[name][1].metadata
    flag = "--" + _cli_name(name).replace("_", "-")
    if FIELDS[name][1].default is True:  # an option that is on by default needs its off switch
        flag = f"{flag}/--no-{flag[2:]}"
    info = typer.Option(flag, *meta.get("flags", ()), help=meta["help"], rich_help_panel=meta["panel"],
                        metavar=meta.get("metavar"))
    return Annotated[_cli_type(name), info]


def _cli_default(name: str, defaults: dict[str, Any]) -> Any:
    if name in defaults:
        return defaults[name]
    f = FIELDS[name][1]
    if f.metadata.get("cli_default") is not None:
        return f.metadata["cli_default"]
    return f.default if f.default is not f.default_factory else None  # type: ignore[comparison-overlap]


def with_run_options(exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> Callable:
    """Decorate a command ``fn(ctx, ARGS..., OWN_OPTIONS..., **run)`` so that Typer sees every run option too.

    The run options (all fields that appear on the command line, less
    ``exclude``, with ``defaults`` overriding some defaults) come after the
    command's arguments and before its own options, and reach ``fn`` in
    ``**run`` under their command-line names (``train`` for ``--train``).
    """
    defaults = defaults or {}

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        leading = [p for p in own if p.default is inspect.Parameter.empty]
        trailing = [p for p in own if p.default is not inspect.Parameter.empty]
        generated = [
            inspect.Parameter(_cli_name(name), inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=_cli_default(name, defaults), annotation=_optional_if_none(run_option(name), _cli_default(name, defaults)))
            for name, (_, f) in FIELDS.items() if f.metadata.get("on_cli", True) and name not in exclude
        ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(**kwargs)

        command.__signature__ = inspect.Signature([*leading, *generated, *trailing])  # type: ignore[attr-defined]
        return command

    return decorate


def _optional_if_none(annotated: Any, default: Any) -> Any:
    """``Annotated[Optional[T], ...]`` when a command's default for the option is ``None`` (``compare-policies --seed``)."""
    base, *extras = typing.get_args(annotated)
    if default is None and type(None) not in typing.get_args(base):
        return Annotated[(Optional[base], *extras)]  # type: ignore[return-value]
    return annotated


def run_values(params: dict[str, Any]) -> dict[str, Any]:
    """The run options in parsed command-line ``params``, under the configuration's names and in its types."""
    out: dict[str, Any] = {}
    for name, (_, f) in FIELDS.items():
        key = _cli_name(name)
        if not f.metadata.get("on_cli", True) or key not in params:
            continue
        value, parse = params[key], f.metadata.get("parse")
        out[name] = parse(value) if parse is not None and value is not None else value
    return out
