"""The `loraleak` command's runner, shared by `loraleak.cli` and each stage's own entry point.

`run_command(parser, argv)` parses, sets up logging and runs the chosen handler; every user-facing
failure (a `LoraleakError`) is one line on stderr and exit status 2; Ctrl-C and SIGTERM end it cleanly
(130, 143), and whatever the end, the local Ray it started is shut down (`cluster.shutdown_ray`). `loraleak.cli.main` runs it on
the whole parser; `zoo_main`, `attack_main`, `pipeline_main`... (what `jobs/*.py` call) on a parser
with only their own commands, so a stage's CLI never imports the top-level one (no import cycle).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .cluster import shutdown_ray
from .errors import LoraleakError

DESCRIPTION = ("Measure whether a shared LoRA fine-tune of a diffusion model leaks the face it was trained on. "
               "Stages: identities -> base -> finetune -> zoo -> attack -> evaluate.")


class DefaultsFormatter(argparse.HelpFormatter):
    """`--help` with each option's default, where it has one worth saying (not None, False or [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        default = action.default
        if not text or "%(default)" in text or "(default" in text or default is argparse.SUPPRESS \
                or default is None or default is False or default == []:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """Every `loraleak` parser and subcommand parser: help shows defaults (DefaultsFormatter)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def new_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The `loraleak` parser (with -v) and its subcommand group, for the caller to add commands to."""
    parser = Parser(prog="loraleak", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    return parser, sub


def stage_main(add_commands: Callable[[Any], None], argv: list[str]) -> int:
    """One stage's commands on their own (`zoo_main`, `attack_main`...): the `loraleak` runner on a parser
    that has only them, so errors, logging and interrupts are handled as by the `loraleak` command."""
    parser, sub = new_parser()
    add_commands(sub)
    return run_command(parser, argv)


def _configure_logging(verbose: bool) -> None:
    """Our own progress at INFO; third-party libraries only when they have something serious to say
    (their INFO chatter and optional-dependency notices would bury the one line that matters)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("loraleak").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for noisy in ("transformers", "diffusers", "httpx", "httpx2", "huggingface_hub", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # The same for the Ray workers a local Ray starts (they inherit this environment): without it
        # every zoo, attack and evaluation worker prints transformers' notices and weight-loading bars.
        for variable, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                                ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
            os.environ.setdefault(variable, value)
        try:  # transformers and diffusers load slowly: only once a command runs
            from transformers.utils import logging as hf_logging
            from diffusers.utils import logging as df_logging

            hf_logging.set_verbosity_error()
            df_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover - both are hard dependencies
            pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `ray job stop`), raised where the command is, so that it ends as after Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the command like Ctrl-C (locks released, MLflow runs closed, its local Ray stopped)
    rather than at once; only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, run the handler; a LoraleakError is one line and status 2, Ctrl-C 130, SIGTERM 143. Whatever the
    end, the local Ray the command started (if any) is shut down; one it joined is left running."""
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        with _sigterm_as_interrupt():
            try:
                status = args.func(args)  # a handler may return an exit status (audit: 1 above --fail-above)
            finally:
                shutdown_ray()
    except LoraleakError as e:
        print(f"loraleak: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"loraleak: {stopped}; finished work is kept and a rerun resumes", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return status if isinstance(status, int) else 0


