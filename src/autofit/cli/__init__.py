"""``autofit`` command line: ``plan``, ``doctor``, ``run``, ``batch`` and ``cache``, one module each
(each with its ``add_parser``); :mod:`.args` holds their shared argument types and checks,
:mod:`.terminal` what reaches the terminal.

One error boundary (:func:`main`): every failure is one line on stderr that says what to do, with
the exit code of :data:`EXIT_CODES`; ``--debug`` shows the traceback of an unexpected error (and
the dependencies' notices, silenced otherwise). User errors are found before any model is loaded
(an output path that cannot be written among them). Results go to stdout (``--json``: one JSON
document), log events to stderr; a closed stdout (``| head``) ends the command quietly. torch and
diffusers are imported only by the commands that need them, so ``--help`` and ``--version`` are fast.
"""

from __future__ import annotations

import argparse
import sys

from autofit.cli import batch, cache, doctor, plan, run
from autofit.cli.args import SIZE_HELP, OutputError, Parser, UsageError
from autofit.cli.terminal import logs_to_stderr, one_line, quiet_dependencies, stdout_gone

__all__ = ["EXIT_CODES", "OutputError", "UsageError", "build_parser", "main"]

COMMANDS = (plan, doctor, run, batch, cache)
# What each exit code means (README, "Command line"; the --help epilog).
EXIT_CODES = {
    0: "done",
    1: "failed: nothing fits (plan), an output that cannot be written, an unexpected error",
    2: "a mistake in the command, found before any model is loaded",
    3: "run: memory ran out at the last rung",
    4: "batch: some items failed (see manifest.jsonl)",
    130: "interrupted (Ctrl-C)",
    141: "stdout was closed early (| head): nothing more is printed",
}


def build_parser() -> argparse.ArgumentParser:
    """``autofit`` and its commands, each added by its module's ``add_parser``."""
    from autofit import __version__

    codes = "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items())
    parser = Parser(prog="autofit", description="Fit diffusers pipelines to the memory you have.",
                    epilog=f"{SIZE_HELP}. Exit codes: {codes}.")
    parser.add_argument("--version", action="version", version=f"autofit {__version__}")
    # --debug and --quiet go before or after the command (SUPPRESS: a subcommand's default does
    # not override what was given before it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an unexpected error, show the traceback instead of one line; show the "
                             "dependencies' warnings and loading bars too")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, and only errors from autofit and its dependencies on stderr")
    for action in common._actions:
        parser._add_action(action)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add = sub.add_parser
    sub.add_parser = lambda *a, **k: add(*a, parents=[common], **k)  # type: ignore[method-assign]
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The error boundary: whatever goes wrong is one line on stderr and an exit code of
    :data:`EXIT_CODES` (``--debug``: an unexpected error's traceback too)."""
    args = build_parser().parse_args(argv)
    from autofit.errors import AutoFitUsageError

    debug, quiet = getattr(args, "debug", False), getattr(args, "quiet", False)
    say = f"autofit {args.command}:"
    try:
        # Dependencies' notices are silenced for every command; --debug shows them.
        with quiet_dependencies(not debug or quiet, bars=not quiet), logs_to_stderr(quiet):
            code = int(args.fn(args))
            sys.stdout.flush()  # a closed pipe shows here, inside the boundary
            return code
    except (UsageError, AutoFitUsageError) as exc:
        print(f"{say} {exc}", file=sys.stderr)
        return 2
    except OutputError as exc:
        print(f"{say} {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{say} interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        stdout_gone()
        return 141
    except Exception as exc:
        if debug:
            raise
        import torch

        what = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else "unexpected error"
        print(f"{say} {what}: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback; "
              "if it looks like a bug in autofit, report it with that traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
