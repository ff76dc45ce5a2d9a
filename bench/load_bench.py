"""Start-up: minimal_vit_inet.py's load of a local folder's two splits against one datasets.load_dataset call
per split (the script's load before 2026-12-05). datasets resolves a folder's data files by globbing all of
them on every call (about 30 s for CIFAR-10's 60,000 JPEGs on a 2-core VM); load_split resolves them once a
run. Each side runs in a fresh process (imports included), in turn (script, baseline, script, ...), so
machine noise hits both; the ratio is the median over rounds.

    python bench/load_bench.py --dataset /tmp/cifar10-jpg --splits train test --rounds 3   # ~6 min
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = {  # each prints the splits' lengths: both sides must load the same images
    "load_split": "import minimal_vit_inet as m; print([len(m.load_split(d, s)) for s in splits])",
    "load_dataset per split": "import datasets; print([len(datasets.load_dataset(d, split=s)) for s in splits])",
}


def timed(code: str, dataset: str, splits: list) -> tuple:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", f"d, splits = {dataset!r}, {splits!r}; {code}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return time.perf_counter() - start, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="a local image folder: DIR/<split>/<class>/*.jpg")
    p.add_argument("--splits", nargs="+", default=["train", "test"])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    seconds = {name: [] for name in SIDES}
    for r in range(args.rounds):
        runs = {name: timed(code, os.path.abspath(args.dataset), args.splits) for name, code in SIDES.items()}
        assert len({out for _, out in runs.values()}) == 1, runs  # the same split lengths on both sides
        for name, (s, _) in runs.items():
            seconds[name].append(s)
        print(f"round {r}: " + "  ".join(f"{name} {s:.1f} s" for name, (s, _) in runs.items())
              + f"  (split lengths {runs['load_split'][1]})", flush=True)
    ratio = statistics.median(a / b for a, b in zip(*seconds.values()))
    print(f"start-up, {' + '.join(args.splits)} splits, whole process: load_split / load_dataset per split = "
          f"{ratio:.2f} (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
