"""The ``segreward`` command. Each subcommand lives in its own module under ``segreward.cli``
with a ``register(subparsers)`` function; handlers parse, call one library function, print.
Library errors (:class:`~segreward.errors.SegrewardError`) become one line on stderr and exit
code 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from segreward.errors import SegrewardError

# Module names under segreward.cli, in the order shown by --help.
_COMMANDS = ("demo", "train", "evaluate", "calibrate", "stats", "logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segreward",
        description="Reward tuning (REINFORCE on task rewards such as per-image mIoU) for semantic segmentation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"segreward.cli.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not written yet
            if e.name == f"segreward.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def _exit_interrupted(signum, frame) -> None:
    sys.stderr.write("segreward: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    # Until a command runs nothing is written, so Ctrl-C while the parser imports torch ends the
    # process at once. Raised as KeyboardInterrupt there, it can be swallowed: torch's C++ import
    # of numpy clears any error, and a half-imported numpy failed later with an AttributeError.
    own = (threading.current_thread() is threading.main_thread()
           and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if own:
        signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        return _main(argv, own)
    except KeyboardInterrupt:  # a caller's own handler, or one left in place
        print("segreward: interrupted", file=sys.stderr)
        return 130
    finally:
        if own:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _main(argv: list[str] | None, own_sigint: bool = False) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides (KEY=VALUE) may come after options such as --resume.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from segreward.engine.allocator import keep_freed_memory
    from segreward.outputs import created_mark, discard_empty_dirs
    keep_freed_memory()  # freed tensors' memory reused, not returned and faulted in again
    mark = created_mark()
    if own_sigint:  # the command handles Ctrl-C itself (cleanup, a kept checkpoint)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = args.func(args)
    except SegrewardError as e:
        discard_empty_dirs(mark)
        print(f"segreward {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        discard_empty_dirs(mark)
        print(f"segreward {args.command}: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        discard_empty_dirs(mark)
        raise
    return int(result or 0)
