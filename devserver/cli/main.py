"""The command line: `python -m devserver [serve] ...`, `replay ...` and `export ...`.

`main(argv)` is callable in-process and returns the exit code. User errors (bad path, bad module,
busy port, unwritable database, a bad fixture line) print one line on stderr and exit with 2; no
traceback. `replay` exits with 1 when a run failed (or the server refused events partway), so it
works as a CI step. This module parses (`args`) and dispatches to `serve` or to `commands`
(`replay`, `export`), and turns their errors into exit codes; the work is done in `replay`, and
the summary is gathered and rendered by `report`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence

from devserver.cli import commands, logs
from devserver.cli.args import COMMANDS, build_parser
from devserver.cli.sending import ReplayError
from devserver.cli.serve import exposure_warning as exposure_warning
from devserver.cli.serve import serve
from devserver.errors import UserError


def _stdout_closed() -> int:
    """The reader of stdout went away (`... | head -2`): stop quietly, as a program killed by
    SIGPIPE would (exit 141), with no traceback and no error at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush now goes nowhere
        os.close(devnull)
    return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # `serve` is the default command, so `--help` alone is its help (which lists the others).
    if not args_list or (args_list[0] not in COMMANDS and args_list[0] != "--version"):
        args_list.insert(0, "serve")
    args = build_parser().parse_args(args_list)
    logs.setup(args.log_level)
    command = {"replay": commands.replay, "export": commands.export}.get(args.command, serve)
    try:
        code = command(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except UserError as exc:
        message = " ".join(exc.message.split())
        print(f"devserver: error: {message}", file=sys.stderr)
        return 2
    except ReplayError as exc:
        print(f"devserver: error: {' '.join(exc.message.split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130 if args.command in ("replay", "export") else 0
