"""Command line: `python -m attnkit demo` (or the `attnkit` console script)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "run every backend against the reference and print a table"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"python -m attnkit: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: python -m attnkit <command> [options]\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:<8} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from .demo import main as demo_main

    return demo_main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
