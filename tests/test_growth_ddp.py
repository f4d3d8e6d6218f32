"""Dynamic sparse training across processes: two gloo ranks on loopback, DistributedDataParallel, different data
on each rank. After many updates every rank must hold the same mask, and pruned weights must be zero on both.

The test starts this file twice as a worker (``python test_growth_ddp.py --worker RANK PORT OUT``), each with a
time limit; the workers exit by themselves and write what they saw to ``OUT``; the test compares the files.
"""

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 60
TIMEOUT = 240          # seconds, for both workers together (they take a few seconds)
METHODS = {            # name -> options; every update step changes the masks
    "rigl": dict(update_every=3), "set": dict(update_every=3), "snfs": dict(update_every=3),
    "dsr": dict(update_every=3), "deepr": dict(update_every=1, temperature=1e-4), "topkast": dict(update_every=3),
}


def worker(rank: int, port: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from torch import nn
    from torch.nn import functional as F

    import sparsity_lib as sl

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    results = {}
    try:
        for name, options in METHODS.items():
            torch.manual_seed(0)   # the same initial weights on both ranks (DDP would broadcast them anyway)
            net = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5))
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            dst = sl.growth.METHODS[name](net, opt, 0.9, end=STEPS, alpha=0.3, distribution="erk", **options)
            model = nn.parallel.DistributedDataParallel(net)
            first = sl.get_masks(net)
            g = torch.Generator().manual_seed(1000 + rank)      # different data on every rank
            local_differs = False
            for step in range(STEPS + 10):
                x, y = torch.randn(32, 16, generator=g), torch.randint(0, 5, (32,), generator=g)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                if step == 2 and dst.needs_dense_gradient:      # step 3 is an update step: tracked
                    local = sl.masks.dense_gradients(net)     # this rank's own dense gradient ...
                    averaged = sl.growth._all_reduce_mean(local)   # ... and what the update uses
                    local_differs = any(not torch.equal(local[k], averaged[k]) for k in local)
                dst.step()
                opt.step()
            masks = sl.get_masks(net)
            weights = {k: w.detach().clone() for k, w in sl.prunable(net).items()}
            results[name] = {"masks": masks, "weights": weights, "first": first, "updates": len(dst.history),
                             "moved": sum(int((masks[k] & ~first[k]).sum()) for k in masks),
                             "local_differs": local_differs, "explored": dst.explored()}
    finally:
        dist.destroy_process_group()
    torch.save(results, out)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_masks_agree_across_two_ddp_ranks(tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    outs = [tmp_path / f"rank{r}.pt" for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(port), str(outs[r])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"the two DDP workers did not finish within {TIMEOUT} s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
    rank0, rank1 = (torch.load(o, weights_only=False) for o in outs)
    for name in METHODS:
        a, b = rank0[name], rank1[name]
        assert a["updates"] == b["updates"] > 0, name
        for layer in a["masks"]:
            assert torch.equal(a["masks"][layer], b["masks"][layer]), f"{name}: masks differ on {layer}"
            for r in (a, b):
                assert (r["weights"][layer][~r["masks"][layer]] == 0).all(), f"{name}: pruned weight nonzero"
            assert torch.equal(a["weights"][layer], b["weights"][layer]), f"{name}: weights differ on {layer}"
        if name != "deepr":   # the masks really moved (DeepR moves only when a sign flips)
            assert a["moved"] > 0 and a["explored"] > 0.1 + 1e-3, name
        if name in ("rigl", "snfs", "topkast"):   # the averaging mattered: each rank's own gradient differed
            assert a["local_differs"] and b["local_differs"], name


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
