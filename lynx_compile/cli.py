"""The ``lynx-compile`` command. Subcommands: ``eval`` (see ``lynx-compile eval --help``)."""

from __future__ import annotations

import sys

SUBCOMMANDS = ("eval",)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        given = f"unknown subcommand {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        raise SystemExit(f"{given}usage: lynx-compile {{{','.join(SUBCOMMANDS)}}} [options]")
    from lynx_compile.eval.__main__ import main as eval_main

    eval_main(argv[1:])
