"""Ray job entrypoint: `echo-ssl evaluate` on the running cluster.

Submit from the project folder:
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py --config configs/evaluate.yaml
Flags after --config override the file (see `echo-ssl evaluate --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from echo.cli import main  # noqa: E402

if __name__ == "__main__":
    # Inside a Ray job RAY_ADDRESS is set by the job supervisor; elsewhere connect to a running cluster.
    os.environ.setdefault("RAY_ADDRESS", "auto")
    sys.exit(main(["evaluate", *sys.argv[1:]]))
