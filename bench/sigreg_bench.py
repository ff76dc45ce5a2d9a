"""SIGReg cost: this implementation (sigreg.py) against the naive formula, same inputs, same run.

The naive formula is the one most code uses: x_t = proj[..., None] * t, then cos(x_t) and sin(x_t)
over the whole (N, K, M) tensor, with autograd keeping what it needs of it for backward.

    python bench/sigreg_bench.py            # N in 1024 4096 16384, D=512, K=1024 (a few minutes on 2 cores)
    python bench/sigreg_bench.py --n 1024 --repeats 2
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sigreg  # noqa: E402


def naive_sigreg(z, slices, t_max=3.0, num_points=17):
    """The textbook formula, for reference: stores (N, K, M) angles for backward."""
    t = torch.linspace(0, t_max, num_points, dtype=z.dtype)
    w = torch.full_like(t, 2 * t_max / (num_points - 1))
    w[[0, -1]] /= 2
    gauss = torch.exp(-t.square() / 2)
    x_t = (z @ slices).unsqueeze(-1) * t  # (N, K, M)
    err = (torch.cos(x_t).mean(0) - gauss).square() + torch.sin(x_t).mean(0).square()  # (K, M)
    return (z.shape[0] * (err @ (w * gauss))).mean()


def saved_bytes(fn, z):
    """Bytes autograd keeps for backward (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(z)
    return loss, sum(storages.values())


def fwd_bwd_seconds(fn, z, repeats):
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        z.grad = None
        start = time.perf_counter()
        fn(z).backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--slices", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    test = sigreg.EppsPulley()
    slices = torch.nn.functional.normalize(torch.randn(args.dim, args.slices), dim=0)
    ours = lambda z: test(z, slices).mean()  # noqa: E731
    naive = lambda z: naive_sigreg(z, slices)  # noqa: E731
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={args.dim}, K={args.slices}, 17 knots")
    print(f"{'N':>6} {'ours ms':>9} {'naive ms':>9} {'time ratio':>10} {'ours MB':>8} {'naive MB':>9} {'mem ratio':>10} {'rel diff':>9}")
    first = {}
    for n in args.n:
        z = torch.randn(n, args.dim) * 1.3 + 0.2
        z.requires_grad_(True)
        value, mem_ours = saved_bytes(ours, z)
        ref, mem_naive = saved_bytes(naive, z)
        t_ours, t_naive = fwd_bwd_seconds(ours, z, args.repeats), fwd_bwd_seconds(naive, z, args.repeats)
        first.setdefault("n", n), first.setdefault("ours", t_ours), first.setdefault("naive", t_naive)
        print(f"{n:>6} {1e3 * t_ours:>9.1f} {1e3 * t_naive:>9.1f} {t_ours / t_naive:>10.2f}x "
              f"{mem_ours / 2**20:>8.1f} {mem_naive / 2**20:>9.1f} {mem_ours / mem_naive:>10.3f}x "
              f"{abs(value.item() - ref.item()) / ref.item():>9.1e}")
    if len(args.n) > 1:
        growth = args.n[-1] / first["n"]
        print(f"time growth N={first['n']} -> {args.n[-1]} ({growth:.0f}x samples; linear = {growth:.0f}x): "
              f"ours {t_ours / first['ours']:.1f}x, naive {t_naive / first['naive']:.1f}x")


if __name__ == "__main__":
    main()
