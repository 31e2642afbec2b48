"""What the commands share: the one-line user error, the options several commands take, and the
backend list type. Imports no framework: every command checks its options before a backend loads."""

from __future__ import annotations

import functools

import click

from errors import UserInputError
from training.options import (
    GroupedOption,
    preset_option,
)
from training.recipes import RECIPES

RECIPE = preset_option({name: r.options for name, r in RECIPES.items()},
                       "Start from a named preset of options (options given here or by --config override it): "
                       + "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items()) + ".")



class UserError(click.ClickException):
    """A problem with the user's input: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def user_errors(fn):
    """Turns the project's input errors (`errors.UserInputError`) into `UserError`: one line, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from backend.selection import check_backend

        try:
            check_backend()
            return fn(*args, **kwargs)
        except UserInputError as e:
            raise UserError(str(e)) from None

    return wrapper




# --data-dir may come from --config or, with --resume, from the run itself: checked in _train.
NOT_REQUIRED = {"data_dir": {"default": None}}
RESUME = click.option("--resume", default=None, type=click.Path(file_okay=False), cls=GroupedOption, group="Run", help="Continue the interrupted run in this directory after its last finished epoch (its config.json's options are used; --data-dir may name the data's new place).")
OVERWRITE = click.option("--overwrite", is_flag=True, cls=GroupedOption, group="Run", help="Replace the run in --out: the files this project wrote there are removed before anything new is written; a folder holding anything else is refused (without --overwrite, so is any non-empty --out).")


def installed_backends() -> str:
    import importlib.util

    from backend.selection import SUPPORTED_BACKENDS

    return ",".join(b for b in SUPPORTED_BACKENDS if importlib.util.find_spec(b) is not None)


class BackendList(click.ParamType):
    name = "B1,B2,..."

    def convert(self, value, param, ctx):
        from backend.selection import SUPPORTED_BACKENDS

        items = value if isinstance(value, tuple | list) else str(value).split(",")  # a list from --config
        names = tuple(str(v).strip() for v in items if str(v).strip())
        unknown = [n for n in names if n not in SUPPORTED_BACKENDS]
        if unknown or not names:
            self.fail(f"{value!r}: choose from {', '.join(SUPPORTED_BACKENDS)}", param, ctx)
        return tuple(dict.fromkeys(names))



RUN_DIR = click.argument("run_dir", type=click.Path(file_okay=False))
CHECKPOINT = click.option("--checkpoint", default="final", show_default=True, type=click.Choice(["final", "best", "last"]), help="final: model.keras as saved; best/last: with best.weights.h5 or last.weights.h5.")


# --data-dir, --out and --backends: declared here once; each command says only what differs
# (whether it is required, its default, its help).
def data_dir_option(help: str, required: bool = False, path_type: click.Path | None = None, **attrs):
    """--data-dir: the dataset folder a command reads."""
    return click.option("--data-dir", required=required, default=None, type=path_type or click.Path(), help=help,
                        **attrs)


def out_option(help: str, default: str | None = None, path_type: click.Path | None = None, **attrs):
    """--out: where a command writes (a file or a folder, as `path_type` says)."""
    return click.option("--out", default=default, type=path_type or click.Path(), help=help, **attrs)


def backends_option(group: str):
    """--backends: the backends a study runs on, all installed ones by default."""
    return click.option("--backends", default=installed_backends, show_default="all installed", type=BackendList(),
                        cls=GroupedOption, group=group)
