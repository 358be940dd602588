"""Command line: `python -m mkcompiler demo`."""

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mkcompiler demo    compile a small model, run it, check it, show the queue and kernel")
        return 0 if argv else 2
    if argv[0] == "demo":
        from mkcompiler.demo import main as demo

        return demo()
    print(f"unknown command {argv[0]!r}; try: python -m mkcompiler demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
