"""Launch a module's multi-rank checks once (one torchrun of N ranks) and report each check to pytest."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_names(module) -> list[str]:
    return [n for n in dir(module) if n.startswith("check_") and callable(getattr(module, n))]


def launch(module_name: str, names: list[str], out_dir: str, nproc: int = 2, timeout: int = 900) -> dict:
    """Run ``names`` of ``module_name`` on ``nproc`` gloo ranks; returns {check: [per-rank result]}."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MINDSPEED_LORA_DEVICE="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_port()}", os.path.join(ROOT, "tests", "distributed", "worker.py"),
           module_name, out_dir, *names]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    results: dict[str, list] = {n: [] for n in names}
    for r in range(nproc):
        path = os.path.join(out_dir, f"rank{r}.json")
        data = json.load(open(path)) if os.path.exists(path) else {}
        for n in names:
            results[n].append(data.get(n, {"ok": False, "error": f"rank {r} never reported (exit "
                                            f"{proc.returncode})\n{proc.stderr[-3000:]}"}))
    return results


def assert_check(results: dict, name: str) -> None:
    failures = [f"rank {r}: {res.get('error')}" for r, res in enumerate(results[name]) if not res.get("ok")]
    assert not failures, "\n".join(failures)
