"""Does the method learn? LeJEPA-pretrain a small timm backbone on CIFAR-10 for a fixed CPU budget, then probe it.

Pipeline: minimal_vit_inet.py pretrains on the CIFAR-10 JPEGs (train split, labels unused except by the online
probe) for --budget_min minutes; linear_probe.py then reports linear and k-NN top-1 on the test split for
  - the pretrained backbone,
  - the same architecture at random init (the same seed minimal_vit_inet.py starts from),
  - the raw pixels (the 3072 normalised values of the 32 px view),
all under the same protocol (32 px centre view, LayerNorm + linear head, AdamW, warm-up + cosine).
Target: pretrained >= random init + 20 points, and above raw pixels (about 40%).

CPU choices (2 cores): a ViT at 32 px learns nothing in 30 minutes (about 30 img/s), so the backbone is timm's
resnet18 at 32 px with 2 global (32 px) + 4 local (16 px) views, batch 128, and a 512-wide projector (the
2048-wide default costs as much as the backbone at this size); lr 2e-3 (the official 5e-4 suits 100 epochs, not
one or two) and one DataLoader worker (two took CPU from the training step: 35 against 42 img/s). The step
count is derived from the budget: a 10-step calibration run measures img/s first, then the steps fill the
rest of the budget, spread over as few epochs as hold them, with one warm-up + cosine schedule.

    python bench/quality_cifar10.py                    # 30-minute budget (about 35-45 minutes with the probes)
    python bench/quality_cifar10.py --model resnet10t  # faster per step, but a stronger random init
    python bench/quality_cifar10.py --budget_min 4     # smoke run of the whole pipeline
Data: ../shared/data/cifar10-jpg.tar.gz (train/<class>/*.jpg 5000 per class, test/<class>/*.jpg 1000 per
class), extracted once to --root; the bench skips with a message when the archive is absent.
Measured (quiet 2-core CPU, torch 2.14.1, 30-minute budget), linear / k-NN top-1 on the test split:
    resnet18 : 2,418 steps (6.2 epochs, 29.8 min, 2026-12-01) | LeJEPA 52.21 / 48.08, random init 23.84 / 23.39,
               raw pixels 38.46 / 45.57 -> +28.4 points over random init: PASS
    resnet18 : 500 steps (1.3 epochs, 22.6 min, 2026-11-25: 47 img/s then) | LeJEPA 47.17 / 43.23 -> +23.3
    resnet10t: 682 steps (1.75 epochs, 26.2 min) | LeJEPA 51.32 / 46.88, random init 40.20 / 38.05 -> +11.1
Probes: about 4.5 min per backbone; raw pixels 8 min the first time (features are cached in --out_dir).
"""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Config:
    budget_min: float = 30.0  # pretraining wall-clock budget (calibration included), minutes
    archive: str = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg.tar.gz")
    root: str = "/tmp/cifar10-jpg"  # extracted image folder (train/, test/)
    out_dir: str = "/tmp/lejepa-quality"  # pretraining run, probes and their feature caches
    model: str = "resnet18"  # timm name (see the docstring)
    global_size: int = 32  # px: CIFAR's own size
    local_size: int = 16  # px
    n_local: int = 4  # local views (+ 2 global): 6 views per image
    batch_size: int = 128  # images per step
    proj_hidden: int = 512  # projector width (see the docstring)
    lr: float = 2e-3  # 4x the official 5e-4: a one-epoch run (see the docstring)
    workers: int = 1  # DataLoader workers (1 beat 2 on 2 cores: the training step needs both)
    calib_steps: int = 10  # steps of the throughput calibration run
    threads: int = 0  # > 0: OMP_NUM_THREADS of every child (on a shared machine 1 beat 2 contended threads 4x)


def parse_config() -> Config:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return Config(**vars(p.parse_args()))


def run(cmd, log, threads=0):
    """Run a script of the repo, its output written to a log file; stop the bench if it fails."""
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"error: {cmd[0]} failed, see {log}:\n" + open(log).read()[-3000:])


def pretrain_args(cfg: Config, out: str, steps: int, *extra) -> list:
    """About `steps` steps in as few epochs as hold them (an epoch is at most one pass over the 50k images),
    one warm-up (10% of the steps) + cosine schedule over all of them."""
    epochs = math.ceil(steps / (50_000 // cfg.batch_size))
    return ["minimal_vit_inet.py", "--dataset", cfg.root, "--val_split", "", "--model", cfg.model,
            "--global_size", str(cfg.global_size), "--local_size", str(cfg.local_size), "--n_local", str(cfg.n_local),
            "--batch_size", str(cfg.batch_size), "--proj_hidden", str(cfg.proj_hidden), "--lr", str(cfg.lr),
            "--workers", str(cfg.workers), "--epochs", str(epochs), "--steps_per_epoch", str(math.ceil(steps / epochs)),
            "--warmup_epochs", str(0.1 * epochs), "--out_dir", out, *extra]


def probe(cfg: Config, name: str, *backbone) -> dict:
    out = os.path.join(cfg.out_dir, f"probe-{name}")
    run(["linear_probe.py", *backbone, "--dataset", cfg.root, "--val_split", "test", "--shots", "all",
         "--workers", str(cfg.workers), "--out_dir", out], os.path.join(cfg.out_dir, f"probe-{name}.log"), cfg.threads)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["results"][cfg.root]["all"]


def main(cfg: Config):
    if not os.path.isdir(os.path.join(cfg.root, "test")):
        if not os.path.exists(cfg.archive):
            print(f"skipped: {cfg.archive} not found (CIFAR-10 as JPEGs: train/<class>/*.jpg, test/<class>/*.jpg)")
            return
        os.makedirs(cfg.root, exist_ok=True)
        with tarfile.open(cfg.archive) as tar:
            tar.extractall(cfg.root, filter="data")
    os.makedirs(cfg.out_dir, exist_ok=True)
    t_start = time.perf_counter()

    # calibration: img/s of this machine, then as many steps as fit in the rest of the budget
    calib = os.path.join(cfg.out_dir, "calib")
    shutil.rmtree(calib, ignore_errors=True)  # a fresh measurement, not a resume
    run(pretrain_args(cfg, calib, 1000, "--stop_after", str(cfg.calib_steps), "--log_every", str(cfg.calib_steps // 2)),
        os.path.join(cfg.out_dir, "calib.log"), cfg.threads)
    records = [json.loads(line) for line in open(os.path.join(calib, "metrics.jsonl"))]
    img_s = [r for r in records if "images_per_s" in r][-1]["images_per_s"]  # last interval: loader warm, cache built
    left_s = cfg.budget_min * 60 - (time.perf_counter() - t_start) - 30  # 30 s: start-up and final checkpoint
    steps = max(10, int(left_s * img_s / cfg.batch_size))
    print(f"calibration: {img_s:.1f} img/s -> {steps} steps of {cfg.batch_size} images "
          f"({steps * cfg.batch_size / 50000:.2f} epochs of CIFAR-10) in the remaining {left_s / 60:.1f} min", flush=True)

    run_dir = os.path.join(cfg.out_dir, f"run-{steps}")
    shutil.rmtree(run_dir, ignore_errors=True)  # every bench trains anew (the pretraining script would resume)
    t0 = time.perf_counter()
    run(pretrain_args(cfg, run_dir, steps, "--log_every", "20"), os.path.join(cfg.out_dir, "pretrain.log"), cfg.threads)
    pretrain_min = (time.perf_counter() - t0) / 60
    last = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line][-1]
    print(f"pretrained {steps} steps in {pretrain_min:.1f} min; loss at step {last['step']}: {last['loss']:.4f} "
          f"(invariance {last['invariance']:.4f}, sigreg {last['sigreg']:.3f})", flush=True)

    t0 = time.perf_counter()
    rows = {"LeJEPA": probe(cfg, f"lejepa-{steps}", "--checkpoint", os.path.join(run_dir, "ckpt.pt")),
            "random init": probe(cfg, "random", "--model", cfg.model, "--global_size", str(cfg.global_size)),
            "raw pixels": probe(cfg, "pixels", "--model", "pixels", "--global_size", str(cfg.global_size))}
    print(f"probes: {(time.perf_counter() - t0) / 60:.1f} min (cached features are reused by a later run)\n")

    print(f"| {cfg.model} {cfg.global_size} px, CIFAR-10 test | linear top-1 | k-NN top-1 |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['linear']:.2f} | {r['knn']:.2f} |")
    gain = rows["LeJEPA"]["linear"] - rows["random init"]["linear"]
    ok = gain >= 20 and rows["LeJEPA"]["linear"] > rows["raw pixels"]["linear"]
    print(f"\nLeJEPA - random init: {gain:+.2f} points (target >= +20); above raw pixels: "
          f"{rows['LeJEPA']['linear'] > rows['raw pixels']['linear']} -> {'PASS' if ok else 'BELOW TARGET'} "
          f"(pretraining budget {cfg.budget_min} min, {steps} steps)")


if __name__ == "__main__":
    main(parse_config())
