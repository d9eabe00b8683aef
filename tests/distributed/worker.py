"""Runs many multi-rank checks inside one torchrun launch (megatron-core costs ~9 s to import per process).

Usage (via ``tests.distributed.harness``): worker.py MODULE OUT_DIR CHECK [CHECK ...]
Each check is a function ``check_*(tmp_dir)`` in MODULE; every rank records "ok" or its traceback per check
in OUT_DIR/rank{R}.json. A check that fails on one rank while others wait in a collective is ended by the
process-group timeout, so a broken check fails instead of hanging.
"""
import importlib
import json
import os
import sys
import time
import traceback


def main():
    module_name, out_dir, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    from mindspeed_lora.parallel import initialize

    initialize(1, 1, timeout_minutes=3)
    import torch

    rank = torch.distributed.get_rank()
    mod = importlib.import_module(module_name)
    results = {}
    for name in names:
        tmp = os.path.join(out_dir, name)
        if rank == 0:
            os.makedirs(tmp, exist_ok=True)
        torch.distributed.barrier()
        t = time.time()
        try:
            getattr(mod, name)(tmp)
            results[name] = {"ok": True, "seconds": round(time.time() - t, 2)}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
        try:
            torch.distributed.barrier()
        except Exception:
            break  # a peer died: the remaining checks cannot run collectively
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
