"""Is EchoCLR's frame-order task learnable here, alone and beside the contrastive loss? (issue 16)

The label-efficiency benchmark found EchoCLR's frame-order top-1 at chance (1/24) after 819
steps. This script separates the two possible causes, "no order to learn in the data" and "the
objective as combined does not learn it in this budget", by training the same model
(``tiny3d`` + order head, 4-frame clips, Adam, batches of 32 multi-instance pairs from the
decoded-frame cache) under three objectives:

- ``order``: the frame-order cross-entropy alone;
- ``echoclr``: frame order + NT-Xent on the same shuffled clips (the published EchoCLR loss,
  ``echo-ssl pretrain --method echoclr``), order weight ``--order-weight``;
- ``ordered-nce``: not the published method, a candidate fix: NT-Xent on the clips in their
  true order and the order head on the shuffled ones (two forward passes per step), so that the
  contrastive loss no longer rewards features blind to frame order.

for each clip stride in ``--strides``, and prints the training order top-1 every 100 steps and,
at the end, the frame-order gate (``echo.evaluation.gates``: every permutation of one clip per
held-out video) against chance and the 2x-chance threshold. Data: ``--manifest`` or a small
synthetic corpus (96 px, ``--view-jitter moderate``) written under ``--out``.

    python benchmarks/frame_order_check.py [--steps 1200] [--strides 1,3] [--objectives order,echoclr]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_throughput import cpu_model  # noqa: E402
from echo.data.dataset import SSLClipDataset  # noqa: E402
from echo.data.manifest import load_manifest  # noqa: E402
from echo.data.order import permutations  # noqa: E402
from echo.evaluation.gates import ORDER_FACTOR, gate_metrics  # noqa: E402
from echo.ingest.synth import synthesize  # noqa: E402
from echo.model.networks import SSLModel  # noqa: E402
from echo.train.losses import NTXentLoss, frame_order_loss  # noqa: E402

CLIP_LEN = 4
OBJECTIVES = ("order", "echoclr", "ordered-nce")


def train(rows, held_out, objective: str, stride: int, steps: int, batch: int, lr: float, order_weight: float,
          temperature: float, seed: int, decoded: dict[str, np.ndarray]) -> dict[str, float]:
    """Train one (objective, stride) from scratch; returns the last 100 steps' training order
    top-1 and the held-out gate metrics."""
    dataset = SSLClipDataset(rows, method="echoclr", clip_len=CLIP_LEN, stride=stride, seed=seed)
    dataset.cache_decoded(8 << 30, decoded)
    torch.manual_seed(seed)
    model = SSLModel("tiny3d", CLIP_LEN, frame_order=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    contrastive = NTXentLoss(temperature=temperature, gather_distributed=False)
    rng = np.random.default_rng([seed, stride])
    inverse = torch.argsort(permutations(CLIP_LEN), dim=1)  # row k puts permutation k's frames back in order
    hits: list[float] = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        samples = [dataset.sample(int(i), step) for i in rng.integers(len(dataset), size=batch)]
        x = torch.stack([s["view1"] for s in samples] + [s["view2"] for s in samples])  # (2B, 1, T, H, W)
        target = torch.stack([s["order1"] for s in samples] + [s["order2"] for s in samples])  # (2B,)
        out = model(x)
        loss = order_weight * frame_order_loss(out["order_logits"], target)
        if objective == "echoclr":
            z1, z2 = out["projection"].chunk(2)
            loss = loss + contrastive(z1, z2)[0]
        elif objective == "ordered-nce":
            ordered = torch.stack([clip[:, inverse[k]] for clip, k in zip(x, target.tolist())])
            z1, z2 = model(ordered)["projection"].chunk(2)
            loss = loss + contrastive(z1, z2)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        hits.append(float((out["order_logits"].argmax(1) == target).float().mean()))
        if step % 100 == 0:
            print(f"  {objective:11s} stride {stride}  step {step:5d}  loss {loss.item():.3f}  "
                  f"train order top-1 {np.mean(hits[-100:]):.3f}  ({time.perf_counter() - started:.0f} s)", flush=True)
    gates = gate_metrics(model, held_out, CLIP_LEN, torch.device("cpu"), order_videos=256, stride=stride)
    return {"train_order_top1": float(np.mean(hits[-100:])), **gates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default=None, help="a manifest with unlabeled/train and val/test splits "
                        "(default: synthesize a small corpus under --out)")
    parser.add_argument("--out", default="./frame-order-check", help="working folder for the synthetic corpus")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--strides", default="1,3", help="comma-separated clip strides, in frames")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated: " + ", ".join(OBJECTIVES))
    parser.add_argument("--batch", type=int, default=32, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--order-weight", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="model, batches and clips")
    parser.add_argument("--data-seed", type=int, default=1, help="the synthetic corpus (not the benchmark's seed 0)")
    a = parser.parse_args(argv)
    objectives = [o for o in a.objectives.split(",") if o]
    if unknown := set(objectives) - set(OBJECTIVES):
        parser.error(f"unknown objective(s) {sorted(unknown)}; expected {', '.join(OBJECTIVES)}")
    strides = [int(s) for s in a.strides.split(",") if s]
    manifest_uri = a.manifest or synthesize(str(Path(a.out) / "data"), 60, a.data_seed, prevalence=0.25,
                                            splits=(0.5, 0.12, 0.38), unlabeled_patients=100, size=96, min_frames=16,
                                            max_frames=32, difficulty=1.25, view_jitter="moderate", workers=2)
    manifest = load_manifest(manifest_uri)
    rows, held_out = manifest.split("unlabeled", "train"), manifest.split("val", "test")
    print(f"frame-order check: {len(rows)} pretraining videos, {len(held_out)} held out; {a.steps} steps of "
          f"{a.batch} pairs; CPU {cpu_model()}, {torch.get_num_threads()} torch threads", flush=True)
    decoded: dict[str, np.ndarray] = {}
    results = []
    for objective in objectives:
        for stride in strides:
            r = train(rows, held_out, objective, stride, a.steps, a.batch, a.lr, a.order_weight, a.temperature,
                      a.seed, decoded)
            results.append((objective, stride, r))
    chance = 1 / math.factorial(CLIP_LEN)
    print(f"\nobjective    stride  train order top-1  held-out order top-1 (chance {chance:.3f}, gate "
          f">= {ORDER_FACTOR * chance:.3f})  retrieval top-1 (chance)")
    for objective, stride, r in results:
        print(f"{objective:11s}  {stride:6d}  {r['train_order_top1']:17.3f}  {r['order_top1']:.3f} "
              f"({'passed' if r['order_top1'] >= ORDER_FACTOR * chance else 'not learned'})"
              f"{'':30s}{r['retrieval_top1']:.3f} ({r['retrieval_chance']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
