"""What a checkpoint costs the training loop at the paper recipe's size: ViT-L/14 + projector + probe + AdamW
state (about 3.7 GB), written by minimal_vit_inet.py's own code, synchronously (write_atomic) against the
script's Checkpointer (a copy to CPU memory, then a background thread writes it). Prints both stalls, their
ratio, and what each costs a paper-recipe run (100 epochs x 2502 steps, --save_every 1000 + one per epoch) at
an assumed step time (no GPU figure yet: pass the measured one with --step_s).

    python bench/checkpoint_bench.py                      # writes into a temporary folder next to the repo
    python bench/checkpoint_bench.py --dir /scratch/me --step_s 0.3
"""
import argparse
import os
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minimal_vit_inet as mvi  # noqa: E402


def loop_rate(seconds: float) -> float:
    """Small-tensor ops per second from this thread: what a training loop launching kernels can do."""
    n, t0 = 0, time.perf_counter()
    x = torch.ones(8)
    while time.perf_counter() - t0 < seconds:
        x.add_(1)
        n += 1
    return n / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_large_patch14_224")
    p.add_argument("--dir", default="", help="where to write (default: a temporary folder beside the repo)")
    p.add_argument("--step_s", type=float, default=0.3, help="assumed seconds per training step (8 GPUs)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    cfg = mvi.Config(model=args.model, num_slices=64)
    model, sigreg, optimizer, _ = mvi.build_training(cfg, 1000, torch.device("cpu"))
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    optimizer.step()  # creates AdamW's state: two more copies of the weights
    state = mvi.checkpoint_state(model, optimizer, sigreg, 1, cfg)
    size = sum(t.numel() * t.element_size() for t in state["backbone"].values())
    size += sum(t.numel() * t.element_size() for s in state["optimizer"]["state"].values() for t in s.values()
                if torch.is_tensor(t))
    folder = tempfile.mkdtemp(dir=args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    path = os.path.join(folder, "ckpt.pt")
    sync, stall, write, during = [], [], [], []
    base = loop_rate(2.0)
    ckpt = mvi.Checkpointer(path, 0, writer=True)
    for _ in range(args.repeats + 1):  # the first save allocates the Checkpointer's buffers: not counted
        t0 = time.perf_counter()
        mvi.write_atomic(mvi.checkpoint_state(model, optimizer, sigreg, 1, cfg), path)
        sync.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.save(model, optimizer, sigreg, 1, cfg)
        stall.append(time.perf_counter() - t0)
        rates = []
        probe = threading.Thread(target=lambda: rates.append(loop_rate(1.0)))  # the loop runs on meanwhile
        probe.start()
        probe.join()
        ckpt.wait()
        write.append(time.perf_counter() - t0)
        during.append(rates[0] / base)
    os.remove(path)
    os.rmdir(folder)
    saves = 100 * 2502 // 1000 + 100
    run_s = 100 * 2502 * args.step_s
    first, s, a = stall[0], min(sync[1:]), min(stall[1:])
    print(f"checkpoint {size / 1e9:.2f} GB ({args.model} + projector + probe + AdamW) | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | best of {args.repeats}")
    print(f"synchronous write_atomic    : stall {s:6.2f} s")
    print(f"Checkpointer (copy + thread): stall {a:6.2f} s ({a / s:.2f}x; {first:.2f} s at the first save, which "
          f"allocates the buffers), write in the background {min(write[1:]):.2f} s, loop meanwhile at "
          f"{min(during[1:]):.2f}x its speed")
    print(f"paper recipe, {saves} saves over {run_s / 3600:.1f} h at {args.step_s} s/step: synchronous "
          f"{100 * saves * s / run_s:.2f}% of the run, Checkpointer {100 * saves * a / run_s:.2f}% (target <= 1%)")


if __name__ == "__main__":
    main()
