"""``python -m grokxform``: the ``grokxform`` command line (:mod:`grokxform.experiments.cli`)."""

import sys

from grokxform.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
