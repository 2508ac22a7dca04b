"""``python -m kmm`` and the ``kmm`` script."""

import sys


def main() -> None:
    from kmm.tools.cli import main as cli_main
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
