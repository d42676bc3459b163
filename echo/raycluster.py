"""Connecting to Ray: a running cluster (``address``) or a local one started in-process.

A local Ray is single-machine by definition, so it is kept on loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray then binds and connects on 127.0.0.1) with its
dashboard on 127.0.0.1. A real multi-node cluster is reached through its address and is
left as configured.
"""

from __future__ import annotations

import logging
import os
import tempfile

__all__ = ["connect", "TRAIN_DRIVER"]

log = logging.getLogger(__name__)

# A custom resource for Tune trial drivers that launch Train workers (Ray's documented
# pattern), so trials do not hold CPUs the workers need.
TRAIN_DRIVER = "TRAIN_DRIVER"


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (``auto``, ``ray://...``, ``host:port``), or ``RAY_ADDRESS``, or
    start a local Ray on loopback. Does nothing if Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cpus = num_cpus or os.cpu_count() or 1
    # A temp folder of its own: a bare ray.init() would attach to any cluster recorded in the default one.
    temp_dir = tempfile.mkdtemp(prefix="echo-ray-", dir="/tmp")
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "ECHO_SSL_S3_ENDPOINT", "MLFLOW_TRACKING_URI") if k in os.environ}
    ray.init(
        num_cpus=cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        resources={TRAIN_DRIVER: cpus},
        runtime_env={"env_vars": env} if env else None,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
        _temp_dir=temp_dir,
    )
    log.info("started a local Ray on 127.0.0.1 with %d CPUs", cpus)
