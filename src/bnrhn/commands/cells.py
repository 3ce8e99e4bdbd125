"""``bnrhn cells``: list the registered recurrent cells and their options."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cells",
        help="list the recurrent cells and their options",
        description="List the recurrent cells that --cell accepts, with their options and defaults.",
    )
    p.add_argument("name", nargs="?", help="show only this cell")
    p.set_defaults(func=run)


def run(args) -> int:
    from bnrhn.cells import CELLS, cell_options

    names = [args.name] if args.name else list(CELLS)
    for name in names:
        opts = cell_options(name)  # raises ValueError for an unknown name
        print(f"{name:10s} {CELLS[name].description}")
        for key, value in opts.items():
            print(f"{'':10s}   {key} = {value!r}")
    return 0
