"""Hyperparameter search per label fraction with Ray Tune: ``python tune_search.py --config FILE``.

The same code as ``echo-ssl tune``; see ``python tune_search.py --help``.
"""

import sys

from echo.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
