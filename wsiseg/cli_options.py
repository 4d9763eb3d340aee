"""The command line's plumbing: one-line errors and exit codes, signals, option checks and
-q / -v. The commands themselves are in ``wsiseg.cli``; only these two modules know click.

Exit codes: 0 success, 1 failure (bad slide, model, output, full disk, ...), 2 usage error (a bad
option value included), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM: docker stop, Slurm).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click


def user_errors() -> tuple[type[BaseException], ...]:
    from .analysis import MapError
    from .batch import BatchInputError
    from .contract import ContractError
    from .engine import ModelError
    from .outputs import OutputError
    from .slide import SlideError
    return (SlideError, ModelError, ContractError, OutputError, MapError, BatchInputError,
            FileNotFoundError,
            PermissionError, IsADirectoryError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, Slurm, kill): unwinds and cleans up exactly like Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, lambda *_: None)  # a second one must not cut the cleanup short
    raise Terminated()


def _os_error(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}"


class Group(click.Group):
    """One line on stderr for every error: usage errors exit 2, the project's own errors and
    failing file operations 1, Ctrl-C 130, SIGTERM 143."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # type: ignore[override]
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `wsiseg`: the help, as click does
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            click.echo(f"wsiseg: error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"wsiseg: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C while click itself was prompting or parsing
            click.echo("wsiseg: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        in_main = threading.current_thread() is threading.main_thread()  # signal's rule
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
        try:
            return super().invoke(ctx)
        except user_errors() as e:
            click.echo(f"wsiseg: error: {e}", err=True)
            ctx.exit(1)
        except OSError as e:  # a full disk, an I/O error: say which, in one line
            click.echo(f"wsiseg: error: {_os_error(e)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as e:
            what, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
            click.echo(f"wsiseg: {what}; no unfinished output was left behind", err=True)
            ctx.exit(code)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)


# -- option groups: a command takes an options dataclass, not one parameter per option --------

def collect(name: str, build: Callable[..., Any]):
    """Decorate a command callback (below its click decorators): the options named by the
    parameters of ``build`` reach it as one keyword argument, ``name = build(**those)``."""
    keys = list(inspect.signature(build).parameters)

    def decorator(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            kwargs[name] = build(**{k: kwargs.pop(k) for k in keys})
            return f(*args, **kwargs)
        return wrapper
    return decorator


# -- option values: checked by click, so that a bad one is a usage error (exit 2) --------------

class LazyDefault(click.Option):
    """An option whose default comes from an options dataclass, read when it is needed (a run
    or --help), so that `wsiseg --version` does not import numpy and scipy."""

    def get_default(self, ctx: click.Context, call: bool = True):  # type: ignore[override]
        return super().get_default(ctx, call=True)


def default_from(module: str, cls: str, *names: str):
    """The default of field ``names`` (a path through nested dataclasses) of wsiseg.MODULE.CLS."""
    def get():
        value = getattr(importlib.import_module(f"wsiseg.{module}"), cls)()
        for name in names:
            value = getattr(value, name)
        return value
    return get


def checked(check):
    """A click callback that runs ``check(value)`` (which raises ValueError) on a given value."""
    def callback(ctx: click.Context, param: click.Parameter, value):
        if value is None:
            return None
        try:
            return check(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return callback


def size_um(*, zero_ok: bool):
    def check(value: float) -> float:
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise ValueError(f"must be a finite {'non-negative' if zero_ok else 'positive'} "
                             f"number, got {value:g}")
        return value
    return check


def mpp_value(value: float) -> float:
    from .pipeline import check_mpp_override
    return check_mpp_override(value)


def tile_px_value(value: int) -> int:
    from .pipeline import check_tile_size
    return check_tile_size(value)


def verbosity(f):
    """-q / -v, accepted before and after the subcommand."""
    f = click.option("-v", "--verbose", count=True, expose_value=False, callback=_set_verbose,
                     help="More log output (-vv for debug).")(f)
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_quiet,
                        help="Only errors; no progress bar.")(f)


def _set_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    obj = log_settings(ctx)
    obj["verbose"] += value
    configure_logging(obj)


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    obj = log_settings(ctx)
    obj["quiet"] = obj["quiet"] or value
    configure_logging(obj)


def log_settings(ctx: click.Context) -> dict:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {"quiet": False, "verbose": 0, "owns_logging": False}
    ctx.obj = root.obj
    return root.obj


def configure_logging(obj: dict) -> None:
    """Log to stderr at the level -q / -v ask for (left alone when the host program, e.g. a
    test runner, configured logging itself)."""
    level = logging.ERROR if obj["quiet"] else \
        [logging.WARNING, logging.INFO, logging.DEBUG][min(obj["verbose"], 2)]
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="wsiseg: %(levelname)s: %(message)s",
                            stream=sys.stderr)
        obj["owns_logging"] = True
    if obj["owns_logging"]:
        root.setLevel(level)
