"""The ``lynx-compile`` command.

    lynx-compile eval       accuracy, fidelity and decode time: Inductor vs lynx policies and plans
    lynx-compile calibrate  a per-site plan for a checkpoint under an accuracy budget
    lynx-compile explain    what lynx finds and rewrites in a checkpoint's decode step

``lynx-compile <subcommand> --help`` for each one's options.
"""

from __future__ import annotations

import sys

SUBCOMMANDS = ("eval", "calibrate", "explain")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        given = f"unknown subcommand {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        raise SystemExit(f"{given}usage: lynx-compile {{{','.join(SUBCOMMANDS)}}} [options]")
    if argv[0] == "eval":
        from lynx_compile.eval.__main__ import main as run
    elif argv[0] == "calibrate":
        from lynx_compile.calibration.__main__ import main as run
    else:
        from lynx_compile.explain_cli import main as run
    run(argv[1:])
