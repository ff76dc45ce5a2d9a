"""Cost of LeJEPA on top of the backbone: one full training step of minimal_vit_inet.py vs the backbone alone.

Both sides run the same views (uint8 -> normalise on the device, one backbone forward per resolution),
a backward pass and an AdamW step:
  backbone : backbone forward + backward of a trivial loss + AdamW on the backbone
  LeJEPA   : backbone + BatchNorm MLP projector + invariance + SIGReg (all slices) + online probe, AdamW on all
overhead = LeJEPA / backbone - 1 (target <= 5%): median ratio over alternating step pairs, one process.
It then counts the host syncs of the script's real training step (minimal_vit_inet.train_step: colour stage,
forward, loss, backward, AdamW) on a batch as the DataLoader makes it (bench/host_syncs.py: CUDA's sync debug
mode on a GPU; on the CPU the operations that would sync a GPU). Target: 0.
The parts of the overhead are timed alone too: projector + probe forward/backward, SIGReg forward/backward
and the extra AdamW work (projector + probe parameters). With a tiny backbone the 2048-wide projector is
comparable in size to the backbone (vit_tiny: 5.5M vs 4.9M parameters); with ViT-L (304M) it is not.

    python bench/train_step_bench.py                       # vit_tiny at 224/96 px, 2 + 6 views, batch 8
    python bench/train_step_bench.py --model vit_small_patch16_224 --batch 32 --iters 10
    python bench/train_step_bench.py --compile        # also: the LeJEPA step with the backbone compiled (inductor)
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import host_syncs  # noqa: E402
import minimal_vit_inet as mvi  # noqa: E402
from sigreg import SIGReg  # noqa: E402


def timed(step, iters, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--iters", type=int, default=8, help="timed (backbone, LeJEPA) step pairs")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="then time the step with model.backbone.compile()")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    N, V = args.batch, args.n_global + args.n_local
    sizes = [args.global_size] * args.n_global + [args.local_size] * args.n_local
    views = [torch.randint(0, 256, (N, 3, s, s), dtype=torch.uint8, device=device) for s in sizes]
    labels = torch.randint(0, args.num_classes, (N,), device=device)

    backbone = mvi.build_backbone(args.model, args.global_size)
    model = mvi.LeJEPA(backbone, args.proj_hidden, args.proj_dim, args.num_classes).to(device)
    sigreg = SIGReg(num_slices=args.num_slices).to(device)
    opt_backbone = torch.optim.AdamW(model.backbone.parameters(), lr=1e-4, fused=True)
    opt_full = torch.optim.AdamW(mvi.param_groups(model, 5e-2, 1e-6), lr=1e-4, fused=True)  # as the script

    def backbone_step():
        xs = [mvi.normalize(x) for x in views]
        with autocast:
            groups = [xs[:args.n_global], xs[args.n_global:]]  # one forward per resolution, as in training
            emb = torch.cat([model.backbone(torch.cat(g)) for g in groups if g])
            loss = emb.float().square().mean()
        opt_backbone.zero_grad(set_to_none=True)
        loss.backward()
        opt_backbone.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def lejepa_step():
        xs = [mvi.normalize(x) for x in views]
        with autocast:
            emb, proj, logits = model(xs, args.n_global)
            loss, inv, sig = mvi.lejepa_loss(proj, args.n_global, sigreg, 0.05)
            probe_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(args.n_global))  # globals
        opt_full.zero_grad(set_to_none=True)
        (loss + probe_loss).backward()
        opt_full.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        backbone_step(), lejepa_step()
    base, full = [], []
    for _ in range(args.iters):  # pairs, alternating: load from other processes hits both sides alike
        base.append(timed(backbone_step, 1, 0))
        full.append(timed(lejepa_step, 1, 0))
    b, f = statistics.median(base), statistics.median(full)
    paired = statistics.median(fi / bi for fi, bi in zip(full, base))  # robust to slow drifts in machine load

    # the overhead's parts, alone
    emb = torch.randn(V * N, backbone.num_features, device=device, requires_grad=True)
    proj = torch.randn(V, N, args.proj_dim, device=device, requires_grad=True)

    def heads():  # the projector sees every view, the probe the global views (as LeJEPA.forward)
        with autocast:
            probe = model.probe(emb[:args.n_global * N])
            (model.projector(emb).float().sum() + probe.float().sum()).backward()

    def sigreg_only():
        with autocast:
            sigreg(proj).backward()

    head_params = [q for n, q in model.named_parameters() if not n.startswith("backbone.")]
    for q in head_params:
        q.grad = torch.zeros_like(q)
    opt_heads = torch.optim.AdamW(head_params, lr=1e-4)
    parts = {name: timed(fn, args.iters, args.warmup)
             for name, fn in [("projector + probe fwd+bwd", heads), ("SIGReg fwd+bwd", sigreg_only),
                              ("AdamW on projector + probe", opt_heads.step)]}
    print(f"device {device.type} ({torch.get_num_threads()} threads) | torch {torch.__version__} | {args.model} | "
          f"N={N} images, V={V} views ({args.n_global}x{args.global_size}px + {args.n_local}x{args.local_size}px), "
          f"{args.num_slices} slices, projector {backbone.num_features}-{args.proj_hidden}-{args.proj_hidden}-{args.proj_dim}")
    print(f"backbone fwd+bwd+AdamW : {b * 1e3:8.1f} ms/step")
    print(f"full LeJEPA step       : {f * 1e3:8.1f} ms/step")
    for name, seconds in parts.items():
        print(f"  part: {name:28s} {seconds * 1e3:8.1f} ms  ({100 * seconds / b:.1f}% of the backbone step)")
    print(f"ratio {paired:.3f} (median of {args.iters} paired steps) -> LeJEPA overhead {100 * (paired - 1):+.1f}% "
          f"(target <= 5%)")
    print(f"sum of the parts: {100 * sum(parts.values()) / b:+.1f}% of the median backbone step (timed apart from it)")

    if args.compile:  # as the script's --compile: the backbone in place, inductor (the default backend)
        model.backbone.compile()
        t0 = time.perf_counter()
        for _ in range(2):
            lejepa_step()
        compile_s = time.perf_counter() - t0
        compiled = timed(lejepa_step, args.iters, 0)
        print(f"compiled LeJEPA step   : {compiled * 1e3:8.1f} ms/step -> {f / compiled:.2f}x the eager step "
              f"(compilation and the first two steps: {compile_s:.0f} s)")

    # host syncs of the real step: a batch as collate_views makes it in a worker, then mvi.train_step
    cfg = mvi.Config(n_global=args.n_global, n_local=args.n_local, num_slices=args.num_slices)
    mc, g = mvi.MultiCrop(args.global_size, args.local_size, args.n_global, args.n_local), torch.Generator().manual_seed(0)
    scales = [mc.global_scale] * args.n_global + [mc.local_scale] * args.n_local
    items = [([(view[n].cpu(), mc.params(300, 200, size, scale, g)["colour"])
               for view, size, scale in zip(views, sizes, scales)], int(labels[n])) for n in range(N)]
    batch = mvi.collate_views(items)
    if device.type == "cuda":
        batch = ([(x.pin_memory(), c.pin_memory(), (i.pin_memory(), n)) for x, c, (i, n) in batch[0]],
                 batch[1].pin_memory())
    lrs = [1e-4] * len(opt_full.param_groups)
    syncs = []
    for _ in range(3):  # the first call builds the per-device constants
        with host_syncs.count(device) as syncs:
            mvi.train_step(model, opt_full, sigreg, batch, lrs, cfg, autocast, device)
    print(f"host syncs in a training step that does not log: {len(syncs)} (target 0){': ' if syncs else ''}"
          f"{', '.join(sorted(set(syncs)))}")


if __name__ == "__main__":
    main()
