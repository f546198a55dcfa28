"""``python -m gptqkit ...``: the ``gptqkit`` command line (see :mod:`gptqkit.cli`)."""

import sys

from gptqkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
