"""The `ocula` command: `ocula serve [flags]` is `python -m ocula.server.api_server [flags]`."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ocula serve [flags]   (ocula serve --help lists the flags)")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from ocula.server.api_server import main as serve_main

        serve_main(rest)
        return
    print(f"ocula: unknown command {command!r}; try `ocula serve`", file=sys.stderr)
    sys.exit(2)
