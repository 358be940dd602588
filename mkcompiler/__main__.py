"""`python -m mkcompiler ...`: the command line (mkcompiler/tools/cli.py)."""

from mkcompiler.tools.cli import main

if __name__ == "__main__":
    main()
