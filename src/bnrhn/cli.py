"""Command-line interface: ``bnrhn <command> ...`` (also ``python -m bnrhn``).

Every command lives in its own module under :mod:`bnrhn.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the parsed
arguments and returning an exit status). Heavy imports happen inside ``func`` so that
``bnrhn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bnrhn import __version__

# Order = order shown in --help.
COMMAND_MODULES = [
    "bnrhn.commands.demo",
    "bnrhn.commands.compare",
    "bnrhn.commands.cells",
    "bnrhn.commands.features",
    "bnrhn.commands.train",
    "bnrhn.commands.caption",
    "bnrhn.commands.evaluate",
    "bnrhn.commands.score",
    "bnrhn.commands.serve",
    "bnrhn.commands.lm",
    "bnrhn.commands.tasks",
    "bnrhn.commands.analyze",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnrhn",
        description=(
            "Recurrent sequence generators: RNN, LSTM, GRU, MUT1-3, RHN, BN-RHN and BN-LSTM cells, "
            "image captioning (and serving it), character-level language models, long-range tasks and "
            "gradient-flow analysis."
        ),
    )
    parser.add_argument("--version", action="version", version=f"bnrhn {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full Python traceback on errors (also: BNRHN_TRACEBACK=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was asked, for reports' reproduce lines
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if "torch" not in sys.modules:  # OpenMP reads its wait policy when torch is imported (commands import it lazily)
        from bnrhn.openmp_wait import choose_wait_policy

        choose_wait_policy()
    from bnrhn.freed_memory import keep_freed_memory

    keep_freed_memory()  # each training step's large tensors reuse the last step's memory instead of faulting it in
    from bnrhn.errors import UserFacingError  # a module without torch: --help stays fast

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, UserFacingError) as exc:
        # User-facing errors: a clear message without a traceback, unless asked for.
        if args.traceback or os.environ.get("BNRHN_TRACEBACK"):
            raise
        print(f"bnrhn {args.command}: error: {exc}", file=sys.stderr)
        return 2

