"""Ray job entrypoint: `echo-ssl pretrain` on the running cluster.

Submit from the project folder:
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pretrain.py --config configs/pretrain.yaml
Flags after --config override the file (see `echo-ssl pretrain --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from echo.cli import main  # noqa: E402

if __name__ == "__main__":
    # Inside a Ray job RAY_ADDRESS is set by the job supervisor; elsewhere connect to a running cluster.
    os.environ.setdefault("RAY_ADDRESS", "auto")
    sys.exit(main(["pretrain", *sys.argv[1:]]))
