"""The `llmirc` console script: the command line (llmirc.cli) imported under a guard, so that
Ctrl-C while its modules load (a few tenths of a second) exits 130 with one line, as later, and
not with a traceback."""

import sys


def main() -> None:
    try:
        from llmirc.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    cli_main()
