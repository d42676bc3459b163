"""NT-Xent against a loop-based reference, the same loss and gradients under 2-rank DDP, and the
frame-order task."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import free_port
from echo.train import distributed
from echo.data.order import MAX_ORDER_CLIP_LEN, permutations
from echo.train.losses import NTXentLoss, frame_order_loss


def reference_ntxent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> tuple[torch.Tensor, float]:
    """SimCLR's NT-Xent straight from its definition, one anchor at a time, in float64.

    Anchor i of the 2N embeddings has its partner view as positive; the denominator runs over
    every k != i. Returns (mean loss over the 2N anchors, fraction whose nearest other is the
    positive).
    """
    z = torch.cat([z0, z1]).double()
    n2 = z.shape[0]
    n = n2 // 2
    unit = [z[i] / z[i].norm() for i in range(n2)]
    total = z.new_zeros(())
    hits = 0
    for i in range(n2):
        pos = (i + n) % n2
        sims = {k: torch.dot(unit[i], unit[k]) / temperature for k in range(n2) if k != i}
        denominator = sum(torch.exp(s) for s in sims.values())
        total = total - (sims[pos] - torch.log(denominator))
        hits += int(max(sims, key=lambda k: sims[k].item()) == pos)
    return total / n2, hits / n2


@pytest.mark.parametrize(("n", "d", "temperature"), [(2, 3, 0.05), (7, 16, 0.05), (5, 4, 0.5)])
def test_ntxent_matches_reference(n: int, d: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(n * 100 + d)
    z0 = torch.randn(n, d, generator=g)
    z1 = z0 + 0.8 * torch.randn(n, d, generator=g)  # correlated views: accuracy is not trivial
    loss, acc = NTXentLoss(temperature)(z0, z1)
    ref_loss, ref_acc = reference_ntxent(z0, z1, temperature)
    assert loss.shape == () and acc.shape == ()
    assert not acc.requires_grad
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert acc.item() == pytest.approx(ref_acc)


def test_ntxent_gradient_matches_reference() -> None:
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    NTXentLoss(0.1)(z0, z1)[0].backward()
    got = (z0.grad.clone(), z1.grad.clone())
    z0.grad = z1.grad = None
    reference_ntxent(z0, z1, 0.1)[0].backward()
    torch.testing.assert_close(got, (z0.grad, z1.grad), rtol=1e-5, atol=1e-6)


def test_ntxent_perfect_pairs_are_retrieved() -> None:
    z = torch.eye(4)
    loss, acc = NTXentLoss(0.5)(z, z)
    assert acc.item() == 1.0
    # Each anchor: positive at cos 1, the other 6 at cos 0.
    assert loss.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 6)), rel=1e-5)


def test_ntxent_checks_arguments() -> None:
    for bad in (0, -1.0, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="temperature"):
            NTXentLoss(bad)  # type: ignore[arg-type]
    loss = NTXentLoss()
    with pytest.raises(ValueError, match=r"same shape .*\(4, 8\) and \(4, 6\)"):
        loss(torch.randn(4, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        loss(torch.randn(4, 8, 2), torch.randn(4, 8, 2))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        loss(torch.randn(1, 8), torch.randn(1, 8))


def test_distributed_helpers_without_process_group() -> None:
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    x = torch.randn(3, 2)
    assert distributed.gather_with_grad(x) is x


# ---- world size 2 under DDP (gloo, CPU) -------------------------------------------------------

GLOBAL_N, IN_DIM, OUT_DIM, TEMPERATURE = 6, 8, 4, 0.1
SPLITS = ((3, 3), (2, 4))  # rows per rank: equal, and unequal (a short last batch)


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(GLOBAL_N, IN_DIM, generator=g)
    return x0, x0 + 0.5 * torch.randn(GLOBAL_N, IN_DIM, generator=g)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(IN_DIM, OUT_DIM)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        x0, x1 = _global_batch()
        results = {}
        for split in SPLITS:
            model = DistributedDataParallel(_encoder())
            start = sum(split[:rank])
            rows = slice(start, start + split[rank])
            z = model(torch.cat([x0[rows], x1[rows]]))  # one forward over both views
            loss, acc = NTXentLoss(TEMPERATURE)(z[: split[rank]], z[split[rank] :])
            loss.backward()
            results[split] = {
                "loss": loss.detach(),
                "acc": acc,
                "grads": {k: p.grad.clone() for k, p in model.module.named_parameters()},
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_loss_and_gradients_equal_single_process(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_ddp_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)

    x0, x1 = _global_batch()
    single = _encoder()
    z = single(torch.cat([x0, x1]))
    ref_loss, ref_acc = NTXentLoss(TEMPERATURE)(z[:GLOBAL_N], z[GLOBAL_N:])
    ref_loss.backward()
    ref_grads = {k: p.grad for k, p in single.named_parameters()}
    # The single-process loss itself against the loop reference (float64 encoder).
    oracle = _encoder().double()
    zd = oracle(torch.cat([x0, x1]).double())
    oracle_loss, oracle_acc = reference_ntxent(zd[:GLOBAL_N], zd[GLOBAL_N:], TEMPERATURE)
    oracle_loss.backward()
    torch.testing.assert_close(ref_loss.double(), oracle_loss.detach(), rtol=1e-5, atol=1e-5)
    for k, p in oracle.named_parameters():
        torch.testing.assert_close(ref_grads[k].double(), p.grad, rtol=1e-5, atol=1e-5)

    for r in range(world):
        results = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for split in SPLITS:
            got = results[split]
            torch.testing.assert_close(got["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-5)
            assert got["acc"].item() == pytest.approx(ref_acc.item()) == pytest.approx(oracle_acc)
            assert got["grads"].keys() == ref_grads.keys()
            for k, grad in got["grads"].items():
                torch.testing.assert_close(grad, ref_grads[k], rtol=1e-5, atol=1e-5, msg=f"rank {r} {split} {k}")


# ---- frame order ------------------------------------------------------------------------------


def test_permutations_lexicographic() -> None:
    p = permutations(4)
    assert p.dtype == torch.long and p.shape == (24, 4)
    assert p[0].tolist() == [0, 1, 2, 3] and p[1].tolist() == [0, 1, 3, 2] and p[-1].tolist() == [3, 2, 1, 0]
    assert len({tuple(r) for r in p.tolist()}) == 24
    assert sorted(p.tolist()) == p.tolist()
    p[0, 0] = 9  # a caller's copy: the shared table stays intact
    assert permutations(4)[0].tolist() == [0, 1, 2, 3]
    assert permutations(1).tolist() == [[0]]
    for bad in (0, MAX_ORDER_CLIP_LEN + 1, 2.0, True):
        with pytest.raises(ValueError, match="clip_len"):
            permutations(bad)  # type: ignore[arg-type]


def test_frame_order_loss() -> None:
    k = 24
    target = torch.tensor([0, 5, 23])
    uniform = torch.zeros(3, k, requires_grad=True)
    loss = frame_order_loss(uniform, target)
    assert loss.item() == pytest.approx(math.log(k))
    loss.backward()
    assert uniform.grad[torch.arange(3), target].lt(0).all()  # pushes the true class up
    confident = F.one_hot(target, k).float() * 50
    assert frame_order_loss(confident, target).item() < 1e-6
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        frame_order_loss(torch.zeros(3), target)
    with pytest.raises(ValueError, match=r"\(N,\) with N = 3"):
        frame_order_loss(torch.zeros(3, k), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 24\)"):
        frame_order_loss(torch.zeros(3, k), torch.tensor([0, 1, 24]))
    with pytest.raises(ValueError, match="integer"):
        frame_order_loss(torch.zeros(3, k), torch.zeros(3))


def test_ntxent_keeps_float32_under_autocast() -> None:
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(16, 32, generator=g)
    z1 = z0 + 3.0 * torch.randn(16, 32, generator=g)  # a loss of order 1: bf16 error shows
    expected = NTXentLoss(0.05)(z0, z1)[0]
    assert expected.item() > 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = NTXentLoss(0.05)(z0, z1)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
