"""Each option declared once: a config field carries its flag, type, help and --help group,
and the click options of every command that takes it are made from that field.

Keras-free (click only), so options are checked before a backend loads. timm's habit, in
small: `--config FILE` supplies the defaults (an earlier run's config.json reproduces it),
options given on the command line override them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

REQUIRED = dataclasses.MISSING
# Options that name where a run goes, not what it is: never taken from a --config file.
NOT_FROM_CONFIG = ("out", "runs_root")


def option(default: Any = REQUIRED, help: str = "", *, type: click.ParamType | type | None = None,
           flag: str | None = None, group: str = "Training", show_default: bool = True) -> Any:
    """A config field that is also a command-line option (`--name`, or `flag`).

    A bool field becomes a `--name/--no-name` switch; a `type` checks the value as click parses it.
    """
    cli = {"type": type, "flag": flag, "group": group, "help": help, "show_default": show_default}
    return dataclasses.field(default=default, metadata={"cli": cli})


class GroupedOption(click.Option):
    """A click option that knows its --help section."""

    def __init__(self, *args, group: str = "Options", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """--help lists the options section by section, in the order they were declared."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "group", "Other options"), []).append(record)
        for name, records in sections.items():
            with formatter.section(name):
                formatter.write_dl(records)


class FloatPair(click.ParamType):
    """`LOW,HIGH`: two numbers, the first not above the second."""

    name = "LOW,HIGH"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple | list):  # a default, or a value from a --config file
            value = ",".join(str(v) for v in value)
        try:
            low, high = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not two comma-separated numbers", param, ctx)
        if low > high:
            self.fail(f"{value!r}: the first number must not exceed the second", param, ctx)
        return (low, high)


class SizeOrName(click.ParamType):
    """A side in pixels within `[low, high]`, or one of `names` (a size another option decides)."""

    def __init__(self, low: int, high: int, names: tuple[str, ...]) -> None:
        self.low, self.high, self.names = low, high, names
        self.name = f"{low}-{high}|{'|'.join(names)}"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high):
            return value
        if str(value).strip().lower() in self.names:
            return str(value).strip().lower()
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a whole number of pixels or one of {', '.join(self.names)}", param, ctx)
        if not self.low <= number <= self.high:
            self.fail(f"{number} is not in the range {self.low}-{self.high}", param, ctx)
        return number


class PositiveFloat(click.ParamType):
    """A finite number above zero (a learning rate: nan, inf, 0 and negatives are refused here,
    not found out as a diverged run)."""

    name = "FLOAT>0"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number <= 0:
            self.fail(f"{value!r} must be a finite number above 0", param, ctx)
        return number


class LevelList(click.ParamType):
    """Comma-separated values of an option (a grid's levels), each checked by the option's own type."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        label = "|".join(inner.choices) if isinstance(inner, click.Choice) else inner.name.upper()
        self.name = f"{label}[,...]"

    def convert(self, value, param, ctx):
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        levels = [self.inner.convert(str(v).strip(), param, ctx) for v in items if str(v).strip()]
        if not levels:
            self.fail("give at least one value", param, ctx)
        return list(dict.fromkeys(levels))


def _shown(default: Any) -> str | bool:
    """How --help shows a default: a pair as `0.75,1.33333` (what one would type)."""
    if isinstance(default, tuple):
        return ",".join(f"{v:g}" for v in default)
    return True


def cli_fields(config_cls: type, names: Iterable[str] | None = None) -> list[dataclasses.Field]:
    """The fields of `config_cls` that are options (all, or those in `names`, in declaration order)."""
    wanted = set(names) if names is not None else None
    return [f for f in dataclasses.fields(config_cls)
            if "cli" in f.metadata and (wanted is None or f.name in wanted)]


def field_names(config_cls: type, *groups: str) -> list[str]:
    """The names of `config_cls`'s option fields (those in `groups`, or all), in declaration order."""
    return [f.name for f in cli_fields(config_cls) if not groups or f.metadata["cli"]["group"] in groups]


def _click_option(field: dataclasses.Field, changes: dict) -> Callable:
    cli = dict(field.metadata["cli"], **changes)
    has_default = "default" in changes or field.default is not REQUIRED
    default = changes.get("default", field.default if field.default is not REQUIRED else None)
    dashed = field.name.replace("_", "-")
    flag = cli["flag"] or f"--{dashed}"
    decls = [f"{flag}/--no-{flag[2:]}" if field.type in ("bool", "bool | None") else flag, field.name]
    return click.option(
        *decls, cls=GroupedOption, group=cli["group"], type=cli["type"], help=cli["help"],
        required=not has_default, default=default, hidden=cli.get("hidden", False),
        show_default=_shown(default) if cli["show_default"] and default is not None else False,
    )


def click_options(config_cls: type, names: Iterable[str] | None = None,
                  overrides: dict[str, dict] | None = None) -> Callable:
    """Decorates a command with the options of `config_cls`'s fields (all or `names`).

    `overrides` maps a field to changed attributes for this command (`default`, `help`,
    `flag`, `type`, `hidden`): e.g. `hybrid`'s recipe, or a grid's `LevelList` type.
    """
    fields = cli_fields(config_cls, names)

    def decorate(fn: Callable) -> Callable:
        for field in reversed(fields):
            fn = _click_option(field, (overrides or {}).get(field.name, {}))(fn)
        return fn

    return decorate


def level_lists(config_cls: type, *names: str) -> dict[str, dict]:
    """`click_options` overrides that let the named options take several comma-separated
    levels (a grid), each level checked by the option's own type."""
    fields = {f.name: f for f in cli_fields(config_cls, names)}
    overrides = {}
    for name in names:
        declared = fields[name].metadata["cli"]
        inner = declared["type"] if isinstance(declared["type"], click.ParamType) else click.STRING
        overrides[name] = {"type": LevelList(inner), "help": declared["help"] + " Several comma-separated values make a grid."}
    return overrides


def command_defaults(config_cls: type, overrides: dict[str, dict] | None = None) -> dict[str, Any]:
    """What each option of a command defaults to (for tests and docs)."""
    return {f.name: (overrides or {}).get(f.name, {}).get("default", f.default) for f in cli_fields(config_cls)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a JSON file: a run's config.json (its `options`), a compare.json (its
    options plus `factors`, `seeds`, `backends`) or a plain {option: value} object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"{path} is not a readable JSON file ({e})", param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} holds no JSON object", param_hint="--config")
    values = dict(data.get("options", data))
    for key in ("factors", "seeds", "backends"):
        if isinstance(data.get(key), dict):
            values.update(data[key])
        elif key in data and "options" in data:
            values[key] = data[key]
    return {k: v for k, v in values.items() if k not in NOT_FROM_CONFIG}


def config_file_option(config_cls: type) -> Callable:
    """`--config FILE`: the file's options (see `read_config_file`) become the command's
    defaults; options given on the command line override them. Options of `config_cls` that
    this command does not take are passed over (a run's config.json given to `pipeline-hash`);
    anything else is an error."""

    def use_file(ctx: click.Context, param: click.Parameter, path: str | None) -> str | None:
        if path is None:
            return None
        values = read_config_file(path)
        known = {p.name for p in ctx.command.params}
        if "seed" in values and "seed" not in known and "seeds" in known:  # a run's config given to compare
            values.setdefault("seeds", [values.pop("seed")])
        unknown = sorted(set(values) - known - {f.name for f in dataclasses.fields(config_cls)})
        if unknown:
            raise click.BadParameter(f"{path}: unknown option(s) {', '.join(unknown)}", param_hint="--config")
        given = {k: v for k, v in values.items() if k in known and v is not None}
        ctx.default_map = {**(ctx.default_map or {}), **given}
        return path

    return click.option(
        "--config", "config_file", default=None, type=click.Path(exists=True, dir_okay=False),
        is_eager=True, callback=use_file, cls=GroupedOption, group="Run",
        help="Defaults from a JSON file: an earlier run's config.json reproduces it; options given here override it.",
    )


def preset_option(presets: dict[str, dict[str, Any]], help: str) -> Callable:
    """`--recipe NAME`: the named preset's options become the command's defaults, below a
    `--config` file's (whichever of the two click handles first) and below the command line.
    Options this command does not take (a grid's seed) are passed over."""

    def use_preset(ctx: click.Context, param: click.Parameter, name: str | None) -> str | None:
        if name is None:
            return None
        known = {p.name for p in ctx.command.params}
        preset = {k: v for k, v in presets[name].items() if k in known}
        ctx.default_map = {**preset, **(ctx.default_map or {})}  # a --config file's values stay on top
        return name

    return click.option(
        "--recipe", "recipe", default=None, type=click.Choice(list(presets)), is_eager=True, callback=use_preset,
        cls=GroupedOption, group="Run", help=help,
    )


def _default_text(param: click.Parameter, ctx: click.Context) -> str:
    if param.required:
        return "required"
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):
        return shown
    default = param.get_default(ctx, call=False)
    if callable(default) or default is None or (isinstance(param, click.Option) and not param.show_default):
        return ""
    if isinstance(param, click.Option) and param.is_flag and param.secondary_opts:
        return param.opts[0] if default else param.secondary_opts[0]
    return _shown(default) if isinstance(default, tuple) else str(default)


def options_reference(group: click.Group, table: Callable[[list[str], list[list[str]]], str]) -> str:
    """Markdown: every command of `group` with its options, section by section (docs/options.md).

    `table(header, rows)` renders a Markdown table."""
    lines = ["# Options", "", "Generated from the command line by `scripts/options-doc`; "
             "`python cli.py COMMAND --help` shows the same.", ""]
    for name, command in group.commands.items():
        if command.hidden:
            continue
        ctx = click.Context(command, info_name=name, parent=click.Context(group, info_name="cli.py"))
        lines += [f"## `{name}`", "", (command.help or "").strip().split("\n\n")[0].replace("\n", " "), ""]
        arguments = [p.human_readable_name for p in command.params if isinstance(p, click.Argument)]
        if arguments:
            lines += [f"Arguments: {' '.join(arguments)}", ""]
        sections: dict[str, list[list[str]]] = {}
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            flags = " / ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
            kind = "" if param.is_flag else param.type.get_metavar(param, ctx) or param.type.name.upper()
            row = [flags, kind or "", _default_text(param, ctx), (param.help or "").replace("|", "\\|")]
            sections.setdefault(getattr(param, "group", "Options"), []).append(row)
        for section, rows in sections.items():
            if len(sections) > 1:
                lines += [f"### {section}", ""]
            lines += [table(["option", "value", "default", "what it does"], rows), ""]
    return "\n".join(lines).rstrip() + "\n"
