"""Multi-crop loading speed: minimal_vit_inet.py's MultiCrop against the straightforward torchvision pipeline.

Both sides start from JPEG bytes (decode included) and make all 2 + 6 views of every photo in
../shared/data/photos/*.jpg; same augmentation table (official README), side by side in one run:
  baseline : PIL decode, then one torchvision.transforms.v2.Compose per view type (RandomResizedCrop,
             flip, ColorJitter p0.8, grayscale p0.2, GaussianBlur(23, (0.1, 2)) p0.5, solarize p0.2,
             ToImage, ToDtype(float32, scale=True), Normalize): float32 views leave the worker
  MultiCrop: the worker's share: PIL decode, crop + resize + flip, every view's colour draws; uint8 views
             leave the worker. Its colour stage (jitter, grayscale, blur, solarize, normalise) runs batched
             on the training device: colour_augment(), once per view size on that size's views of the batch,
             as train_step calls it; timed here separately on this CPU (one thread, a batch of 32 images made
             by collate_views), so "MultiCrop + colour stage on the CPU" shows the cost if there is no GPU.
Per core: one thread, rounds interleaved (baseline, MultiCrop, baseline, ...) so machine noise hits both;
the ratio is the median over rounds, in wall time and in process CPU time (robust to a busy machine).
Total: one worker process per core (multiprocessing pool), each side in turn.

    python bench/multicrop_bench.py                          # 5 rounds over 48 photos, ~1 min on 2 cores
    python bench/multicrop_bench.py --rounds 3 --gpu-images-per-s 400
"""
import argparse
import glob
import io
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch
from PIL import Image
from torchvision.transforms import v2

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import minimal_vit_inet as mvi  # noqa: E402

PHOTOS = os.path.join(HERE, "..", "..", "shared", "data", "photos")


def baseline_pipeline(size, scale):
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(0.2),
        v2.RandomApply([v2.GaussianBlur(23, (0.1, 2.0))], p=0.5),
        v2.RandomSolarize(128, p=0.2),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mvi.IMAGENET_MEAN, mvi.IMAGENET_STD),
    ])


GLOBAL, LOCAL = baseline_pipeline(224, (0.3, 1.0)), baseline_pipeline(98, (0.05, 0.3))
MULTICROP = mvi.MultiCrop(mvi.Config())


def baseline(jpeg: bytes, seed: int) -> list:
    torch.manual_seed(seed)  # v2 transforms draw from the global RNG
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    return [GLOBAL(img) for _ in range(2)] + [LOCAL(img) for _ in range(6)]


def multicrop(jpeg: bytes, seed: int) -> list:
    img = Image.open(io.BytesIO(jpeg))
    img.load()  # decode here, like datasets' Image feature does in the worker
    torch.manual_seed(seed)  # MultiCrop draws from the global RNG, as ViewsDataset seeds it
    return MULTICROP(img)


SIDES = {"baseline": baseline, "MultiCrop": multicrop}


def one_pass(fn, jpegs):
    """Wall and CPU seconds to make all views of all photos, single thread."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i, jpeg in enumerate(jpegs):
        fn(jpeg, i)
    return time.perf_counter() - wall, time.process_time() - cpu


def colour_stage_rate(groups, n_images, rounds=3) -> float:
    """Images/s of the colour stage on n_images' views, after a warm-up call: colour_augment once per view
    size (groups: collate_views' (pixels, colour) pairs). Process CPU time on the CPU (per core, robust to a
    busy machine), synchronised wall time on a GPU."""
    def run():
        for x, c in groups:
            mvi.colour_augment(x, c)
    cuda = groups[0][0].is_cuda
    clock = time.perf_counter if cuda else time.process_time
    run()
    if cuda:
        torch.cuda.synchronize()  # the warm-up's kernels finish outside the timed span
    start = clock()
    for _ in range(rounds):
        run()
    if cuda:
        torch.cuda.synchronize()
    return rounds * n_images / (clock() - start)


def _worker_init():
    torch.set_num_threads(1)


def _pool_task(args):
    name, jpeg, seed = args
    SIDES[name](jpeg, seed)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--photos", default=PHOTOS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1, help="passes over the photos per round")
    p.add_argument("--gpu-images-per-s", type=float, default=400.0,
                   help="images/s one GPU consumes (ViT-L/14 on an H100: several hundred)")
    args = p.parse_args()
    files = sorted(glob.glob(os.path.join(args.photos, "*.jpg")))
    if not files:
        print(f"skipped: no photos in {os.path.abspath(args.photos)}")
        return
    jpegs = [open(f, "rb").read() for f in files] * args.repeat
    torch.set_num_threads(1)
    print(f"{len(files)} photos, {len(jpegs)} images per pass, 8 views each (2 x 224 + 6 x 98), "
          f"torch {torch.__version__}")

    for fn in SIDES.values():  # warm-up (imports, first-call costs)
        one_pass(fn, jpegs[:4])
    wall, cpu = {n: [] for n in SIDES}, {n: [] for n in SIDES}
    for r in range(args.rounds):
        for name, fn in SIDES.items():
            w, c = one_pass(fn, jpegs)
            wall[name].append(len(jpegs) / w)
            cpu[name].append(len(jpegs) / c)
        print(f"round {r}: " + "  ".join(f"{n} {wall[n][-1]:6.1f} img/s ({cpu[n][-1]:6.1f} per CPU-s)"
                                         for n in SIDES))
    ratio_wall = statistics.median(m / b for m, b in zip(wall["MultiCrop"], wall["baseline"]))
    ratio_cpu = statistics.median(m / b for m, b in zip(cpu["MultiCrop"], cpu["baseline"]))
    per_core = {n: statistics.median(cpu[n]) for n in SIDES}
    print(f"per core (median images per CPU-second): baseline {per_core['baseline']:.1f}, "
          f"MultiCrop {per_core['MultiCrop']:.1f}")
    print(f"speed-up per core: {ratio_cpu:.2f}x in CPU time, {ratio_wall:.2f}x in wall time "
          f"(median of per-round ratios)")

    # the colour stage MultiCrop leaves to the device, here on this CPU: a batch of 32 images' views, one
    # call per view size (2 x 224 px, then 6 x 98 px: (V_s * 32, 3, S, S) each), as in training
    n = min(32, len(jpegs))  # the batch's images
    groups, _ = mvi.collate_views([(multicrop(j, i), 0) for i, j in enumerate(jpegs[:n])])
    colour_per_core = colour_stage_rate(groups, n)
    both = 1 / (1 / per_core["MultiCrop"] + 1 / colour_per_core)
    print(f"colour stage (colour_augment, the training device's share) on this CPU: {colour_per_core:.1f} "
          f"img/s per core; MultiCrop + colour stage on the CPU: {both:.1f} img/s per core = "
          f"{both / per_core['baseline']:.2f}x the baseline")
    if torch.cuda.is_available():  # where it is meant to run
        rate = colour_stage_rate([(x.cuda(), c.cuda()) for x, c in groups], n, rounds=10)
        print(f"colour stage on {torch.cuda.get_device_name()}: {rate:.0f} img/s")

    cores = os.cpu_count()
    total = {}
    with mp.get_context("spawn").Pool(cores, initializer=_worker_init) as pool:
        for name in SIDES:
            pool.map(_pool_task, [(name, j, i) for i, j in enumerate(jpegs[:2 * cores])])  # warm the workers
            start = time.perf_counter()
            pool.map(_pool_task, [(name, j, i) for i, j in enumerate(jpegs)], chunksize=4)
            total[name] = len(jpegs) / (time.perf_counter() - start)
    print(f"total with {cores} workers (one per core): "
          + "  ".join(f"{n} {total[n]:.1f} img/s" for n in SIDES))
    for n in SIDES:
        print(f"cores to feed one GPU at {args.gpu_images_per_s:.0f} img/s with {n}: "
              f"{args.gpu_images_per_s / per_core[n]:.0f}")


if __name__ == "__main__":
    main()
