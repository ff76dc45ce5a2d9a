"""Cost of LeJEPA on top of the backbone: a full training step of minimal_vit_inet.py vs the backbone alone.

Both sides take the same inputs: a batch as the DataLoader makes it (MultiCrop, collate_views), already
through the colour stage, one float tensor per view size (V_s * N, 3, S, S), one backbone call each.
  backbone : backbone forward + backward of a trivial loss + fused AdamW on the backbone
  LeJEPA   : backbone + BatchNorm MLP projector + invariance + SIGReg (all slices) + online probe, fused
             AdamW on all (the model and optimiser of minimal_vit_inet.build_training)
overhead = LeJEPA / backbone - 1 (target <= 5%): median ratio over alternating step pairs, one process.
The colour stage is left out of both (any recipe augments; bench/multicrop_bench.py and bench/gpu_check.py
time it).
The parts of the overhead are timed alone too: projector + probe forward/backward, SIGReg forward/backward
and the extra AdamW work (projector + probe parameters). With a tiny backbone the 2048-wide projector is
comparable in size to the backbone (vit_tiny: 5.5M vs 4.9M parameters); with ViT-L (304M) it is not.
It then counts the host syncs of the script's real training step (minimal_vit_inet.train_step: colour stage,
forward, loss, backward, AdamW) on the same batch (bench/host_syncs.py: CUDA's sync debug mode on a GPU; on
the CPU the operations that would sync a GPU). Target: 0.

    python bench/train_step_bench.py                       # vit_tiny at 224/96 px, 2 + 6 views, batch 8
    python bench/train_step_bench.py --model vit_small_patch16_224 --batch 32 --iters 10
    python bench/train_step_bench.py --compile             # also: both with the backbone compiled
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import host_syncs  # noqa: E402
import minimal_vit_inet as mvi  # noqa: E402


def timed(step, iters, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired(backbone_step, lejepa_step, iters):
    """Median step times and the median ratio of alternating pairs (load from other processes hits both)."""
    base, full = [], []
    for _ in range(iters):
        base.append(timed(backbone_step, 1, 0))
        full.append(timed(lejepa_step, 1, 0))
    ratio = statistics.median(f / b for f, b in zip(full, base))  # robust to slow drifts in machine load
    return statistics.median(base), statistics.median(full), ratio


def make_batch(cfg: mvi.Config, num_classes: int, pin: bool):
    """collate_views' output for cfg.batch_size random 300 x 200 images: ([(uint8 pixels, colour)] per view
    size, labels); pinned for non-blocking copies to a GPU, as pin_memory=True does."""
    mc = mvi.MultiCrop(cfg)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)  # MultiCrop draws from the global RNG, as ViewsDataset seeds it
    images = [Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)) for _ in range(cfg.batch_size)]
    items = [(mc(img), n % max(1, num_classes)) for n, img in enumerate(images)]
    groups, labels = mvi.collate_views(items)
    if pin:
        groups, labels = [(x.pin_memory(), c.pin_memory()) for x, c in groups], labels.pin_memory()
    return groups, labels


def backbone_alone(model, batch, cfg, autocast, device):
    """A step of the backbone alone: forward on the step's views (one call per view size), backward of a
    trivial loss, fused AdamW on the backbone's parameters. Its inputs went through the colour stage once,
    beforehand (normalised float, channels_last, as train_step passes them), so a compiled backbone runs the
    graphs the step compiled."""
    xs = [mvi.colour_augment(x.to(device), c.to(device)).contiguous(memory_format=torch.channels_last)
          for x, c in batch[0]]
    optimizer = torch.optim.AdamW(model.backbone.parameters(), lr=cfg.lr, fused=True)

    def step():
        with autocast:
            loss = torch.cat([model.backbone(x) for x in xs]).float().square().mean()  # (V * N, D) -> ()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=8, help="images per step (N)")
    p.add_argument("--global_size", type=int, default=224)
    p.add_argument("--local_size", type=int, default=96, help="96: divisible by the 16 px patch")
    p.add_argument("--n_global", type=int, default=2)
    p.add_argument("--n_local", type=int, default=6)
    p.add_argument("--num_slices", type=int, default=1024)
    p.add_argument("--proj_hidden", type=int, default=2048)
    p.add_argument("--proj_dim", type=int, default=128)
    p.add_argument("--num_classes", type=int, default=1000, help="the online probe's classes (0: no probe)")
    p.add_argument("--iters", type=int, default=8, help="timed (backbone, LeJEPA) step pairs")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="then time both with model.backbone.compile()")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = mvi.Config(model=args.model, global_size=args.global_size, local_size=args.local_size,
                     n_global=args.n_global, n_local=args.n_local, batch_size=args.batch,
                     num_slices=args.num_slices, proj_hidden=args.proj_hidden, proj_dim=args.proj_dim,
                     bf16=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    N, V = args.batch, args.n_global + args.n_local
    model, sigreg, optimizer = mvi.build_training(cfg, args.num_classes, device)  # as the script
    batch = make_batch(cfg, args.num_classes, pin=device.type == "cuda")
    # the inputs: per view size, the colour stage's output (V_s * N, 3, S, S), as train_step makes them
    xs = [mvi.colour_augment(x.to(device), c.to(device)).contiguous(memory_format=torch.channels_last)
          for x, c in batch[0]]
    labels = batch[1].to(device)
    backbone_alone_step = backbone_alone(model, batch, cfg, autocast, device)

    def backbone_step():
        backbone_alone_step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def lejepa_step():  # train_step after its colour stage
        with autocast:
            proj, logits = model(xs, N, args.n_global)  # (V, N, P), (G * N, C)
            loss, inv, sig = mvi.lejepa_loss(proj, args.n_global, sigreg, cfg.lamb)
            if logits is not None:  # the probe learns from the global views only
                loss = loss + F.cross_entropy(logits.float(), labels.repeat(args.n_global))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        backbone_step(), lejepa_step()
    b, f, ratio = paired(backbone_step, lejepa_step, args.iters)

    # the overhead's parts, alone
    emb = torch.randn(V * N, model.backbone.num_features, device=device, requires_grad=True)
    proj = torch.randn(V, N, args.proj_dim, device=device, requires_grad=True)

    def heads():  # the projector sees every view, the probe the global views (as LeJEPA.forward)
        with autocast:
            out = model.projector(emb).float().sum()
            if model.probe is not None:
                out = out + model.probe(emb[:args.n_global * N]).float().sum()
            out.backward()

    def sigreg_only():
        with autocast:
            sigreg(proj).backward()

    head_params = [q for n, q in model.named_parameters() if not n.startswith("backbone.")]
    for q in head_params:
        q.grad = torch.zeros_like(q)
    opt_heads = torch.optim.AdamW(head_params, lr=1e-4, fused=True)
    parts = {name: timed(fn, args.iters, args.warmup)
             for name, fn in [("projector + probe fwd+bwd", heads), ("SIGReg fwd+bwd", sigreg_only),
                              ("AdamW on projector + probe", opt_heads.step)]}
    sizes = " + ".join(f"{len(x) // N}x{x.shape[-1]}px" for x in xs)
    print(f"device {device.type} ({torch.get_num_threads()} threads) | torch {torch.__version__} | "
          f"{args.model} | N={N} images, V={V} views ({sizes}), {args.num_slices} slices, projector "
          f"{model.backbone.num_features}-{args.proj_hidden}-{args.proj_hidden}-{args.proj_dim}, "
          f"{args.num_classes} probe classes")
    print(f"backbone fwd+bwd+AdamW : {b * 1e3:8.1f} ms/step")
    print(f"full LeJEPA step       : {f * 1e3:8.1f} ms/step")
    for name, seconds in parts.items():
        print(f"  part: {name:28s} {seconds * 1e3:8.1f} ms  ({100 * seconds / b:.1f}% of the backbone step)")
    print(f"ratio {ratio:.3f} (median of {args.iters} paired steps) -> LeJEPA overhead "
          f"{100 * (ratio - 1):+.1f}% (target <= 5%)")
    print(f"sum of the parts: {100 * sum(parts.values()) / b:+.1f}% of the median backbone step "
          f"(timed apart from it)")

    # host syncs of the real step on the same batch: mvi.train_step, colour stage included
    syncs = []
    for _ in range(3):  # the first call builds the per-device constants
        with host_syncs.count(device) as syncs:
            mvi.train_step(model, optimizer, sigreg, batch, cfg, autocast, device)
    print(f"host syncs in a training step that does not log: {len(syncs)} (target 0){': ' if syncs else ''}"
          f"{', '.join(sorted(set(syncs)))}")

    if args.compile:  # as the script's --compile: the backbone in place, inductor (the default backend)
        model.backbone.compile()
        t0 = time.perf_counter()
        for _ in range(2):  # compiles each view size's graph, forward and backward; both steps share them
            backbone_step(), lejepa_step()
        compile_s = time.perf_counter() - t0
        cb, cf, cratio = paired(backbone_step, lejepa_step, args.iters)
        print(f"compiled backbone: backbone step {cb * 1e3:.1f} ms, LeJEPA step {cf * 1e3:.1f} ms "
              f"({f / cf:.2f}x the eager one) -> overhead {100 * (cratio - 1):+.1f}% (compilation and two "
              f"step pairs: {compile_s:.0f} s)")


if __name__ == "__main__":
    main()
