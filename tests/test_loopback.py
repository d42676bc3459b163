"""A local Ray started by echo-ssl stays on 127.0.0.1 whatever the caller's environment (issue 17, item 3).

Without ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` read at ``import ray``, Ray's GCS, raylet,
agents and workers listen on every interface and connect through the machine's external
address. The test starts ``connect()`` in a subprocess whose environment lacks the variable
and that imports ``ray`` first (as any module may), then lists every socket of that process
and all its descendants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

PROBE = r"""
import json, sys
import ray  # imported before echo sets anything: the order the issue found
import psutil
from echo.train.launch import connect

connect(num_cpus=1)

@ray.remote(num_cpus=0.5)
def task():
    return 1

assert ray.get(task.remote()) == 1
me = psutil.Process()
sockets = []
for proc in [me, *me.children(recursive=True)]:
    try:
        name = proc.name()
        for c in proc.net_connections(kind="inet"):
            sockets.append({"proc": name, "status": c.status, "local": c.laddr.ip,
                            "remote": c.raddr.ip if c.raddr else None})
    except psutil.Error:
        pass
print("SOCKETS " + json.dumps(sockets), flush=True)
ray.shutdown()
"""

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def test_local_ray_listens_and_connects_on_loopback_only(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SOCKETS "))
    sockets = json.loads(line[len("SOCKETS "):])
    listening = [s for s in sockets if s["status"] == "LISTEN"]
    names = {s["proc"] for s in listening}
    assert {"gcs_server", "raylet"} <= names, names  # the Ray processes were found
    assert [s for s in listening if s["local"] not in LOOPBACK] == []
    assert [s for s in sockets if s["remote"] is not None and s["remote"] not in LOOPBACK] == []
