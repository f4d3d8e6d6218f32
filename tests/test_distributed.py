"""Issue 10 item 5: pruning in data-parallel training, with two gloo processes on loopback (127.0.0.1).

Each scenario runs in a fresh Python process that spawns two ranks (torch.multiprocessing), bounded by a timeout;
the ranks write what they saw to JSON files that the test then checks. Every rank prunes with its *own* calibration
data (rank-dependent), the case that silently gave different weights per rank before.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import copy, json, os, sys, traceback
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch import nn
    from torch.nn import functional as F
    import sparsity_lib as sl

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def rank_data(rank, nan=False):
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        if nan:
            x[0, 0] = float("nan")
        return [(x, y)]

    def gather(t):
        out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return out

    def same_everywhere(t):
        parts = gather(t.float())
        return all(torch.equal(parts[0], p) for p in parts)

    def flat_masks(masks):
        return torch.cat([m.reshape(-1).float() for m in masks.values()])

    def run(rank, port, out):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        torch.set_num_threads(1)
        r = {}
        try:
            data = rank_data(rank)
            # 1. plain model in the group, default sync="broadcast": rank 0's mask everywhere
            local = sl.prune(copy.deepcopy(model()), 0.6, "snip", data=data, sync=None)
            synced = sl.prune(model(), 0.6, "snip", data=data)
            parts = gather(flat_masks(local))
            r["local_masks_differ"] = not torch.equal(parts[0], parts[1])
            r["synced_same"] = same_everywhere(flat_masks(synced))
            r["synced_is_rank0_local"] = bool(torch.equal(gather(flat_masks(synced))[0], parts[0]))

            # 2. sync="scores": one selection from the mean score of the ranks
            m = model()
            scores = sl.scores.get_method("snip").score(copy.deepcopy(m), data=data, loss_fn=F.cross_entropy)
            mean = {n: sum(gather(s)) / 2 for n, s in scores.items()}
            ones = {n: torch.ones_like(s, dtype=torch.bool) for n, s in mean.items()}
            expected = sl.select.global_masks(mean, ones, 0.6)
            got = sl.prune(m, 0.6, "snip", data=data, sync="scores")
            r["scores_same"] = same_everywhere(flat_masks(got))
            r["scores_match_mean"] = all(bool(torch.equal(got[n], expected[n])) for n in got)

            # 3. OBS updates weights: rank 0's weights reach every rank
            m = model()
            sl.prune(m, 0.5, "obs", data=data, negative_curvature="abs")
            r["obs_weights_same"] = all(same_everywhere(w.detach()) for w in sl.prunable(m).values())

            # 4. DDP model without masks: refused before anything changes
            plain = model()
            keys = sorted(plain.state_dict())
            ddp = nn.parallel.DistributedDataParallel(plain)
            try:
                sl.prune(ddp, 0.5)
                r["ddp_unmasked"] = "no error"
            except ValueError as e:
                r["ddp_unmasked"] = str(e)
            r["ddp_unmasked_unchanged"] = sorted(plain.state_dict()) == keys and not sl.masks.is_masked(plain)

            # 5. the documented way: masks before wrapping, prune the DDP model, train: one model on all ranks
            m = model()
            sl.apply_masks(m, sl.get_masks(m))
            ddp = nn.parallel.DistributedDataParallel(m)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            x, y = data[0]
            def step():
                opt.zero_grad()
                F.cross_entropy(ddp(x), y).backward()
                opt.step()
            step()
            masks = sl.prune(ddp, 0.7, "snip", data=data)
            r["ddp_names"] = sorted(masks)
            step(); step()
            weights = sl.prunable(m)
            r["ddp_weights_same"] = all(same_everywhere(w.detach()) for w in weights.values())
            r["ddp_pruned_zero"] = all(bool((weights[n][~mk] == 0).all()) for n, mk in sl.get_masks(m).items())
            r["ddp_sparsity"] = sl.sparsity(m)

            # 6. ranks whose masks diverged are refused; broadcast_masks repairs
            m = model()
            sl.prune(m, 0.5, "random", seed=rank, sync=None)
            before = flat_masks(sl.get_masks(m))
            try:
                sl.prune(m, 0.7)
                r["diverged"] = "no error"
            except ValueError as e:
                r["diverged"] = str(e)
            r["diverged_unchanged"] = bool(torch.equal(before, flat_masks(sl.get_masks(m))))
            r["agree_before_repair"] = sl.distributed.masks_agree(m)
            sl.distributed.broadcast_masks(m)
            r["agree_after_repair"] = sl.distributed.masks_agree(m)

            # 7. bad data on one rank only: every rank raises, nobody hangs
            m = model()
            try:
                sl.prune(m, 0.5, "snip", data=rank_data(rank, nan=(rank == 1)))
                r["one_rank_fails"] = "no error"
            except (ValueError, RuntimeError) as e:
                r["one_rank_fails"] = type(e).__name__ + ": " + str(e)
            r["one_rank_fails_unchanged"] = not sl.masks.is_masked(m)
        except Exception:
            r["crash"] = traceback.format_exc()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(r, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        port, out = int(sys.argv[1]), sys.argv[2]
        mp.spawn(run, args=(port, out), nprocs=2, join=True)
''')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.Popen([sys.executable, str(script), str(free_port()), str(out)], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)          # the worker and the two ranks it spawned, and nothing else
        proc.communicate()
        pytest.fail("the two gloo ranks did not finish within 240 s")
    assert proc.returncode == 0, log.decode()[-3000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert "crash" not in r, r["crash"]
    return results


def test_rank_dependent_data_gives_one_mask(ranks):
    assert ranks[0]["local_masks_differ"]              # without agreeing, the ranks would diverge
    for r in ranks:
        assert r["synced_same"] and r["synced_is_rank0_local"]


def test_sync_scores_selects_from_the_mean_score(ranks):
    for r in ranks:
        assert r["scores_same"] and r["scores_match_mean"]


def test_updated_weights_are_broadcast(ranks):
    assert all(r["obs_weights_same"] for r in ranks)


def test_ddp_without_masks_is_refused_with_the_documented_way(ranks):
    for r in ranks:
        assert "before wrapping" in r["ddp_unmasked"] and "sl.apply_masks" in r["ddp_unmasked"]
        assert r["ddp_unmasked_unchanged"]


def test_masks_before_wrapping_then_prune_the_ddp_model_trains_one_model(ranks):
    for r in ranks:
        assert r["ddp_names"] == ["module.0.weight", "module.2.weight"]
        assert r["ddp_weights_same"] and r["ddp_pruned_zero"]
        assert abs(r["ddp_sparsity"] - 0.7) < 0.01


def test_diverged_masks_are_detected_and_repaired(ranks):
    for r in ranks:
        assert "differ between ranks" in r["diverged"] and "broadcast_masks" in r["diverged"]
        assert r["diverged_unchanged"]
        assert r["agree_before_repair"] is False and r["agree_after_repair"] is True


def test_failure_on_one_rank_is_raised_on_every_rank(ranks):
    assert ranks[1]["one_rank_fails"].startswith("ValueError") and "non-finite" in ranks[1]["one_rank_fails"]
    assert ranks[0]["one_rank_fails"].startswith("RuntimeError") and "another rank" in ranks[0]["one_rank_fails"]
    assert all(r["one_rank_fails_unchanged"] for r in ranks)
