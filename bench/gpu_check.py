"""GPU check: one command that measures, on a lent GPU, what the CPU could not (issue #11, section 3).

It must end within 8 minutes on one H100 (the lease is 15 minutes with the machine's start) and prints
one table at the end, also written to --out (gpu_check.md, gpu_check.json; logs of the end-to-end run):
  1. correctness on the device: SIGReg's value and gradient in fp32 against float64 on the CPU (same
     slices), SIGReg under bf16 autocast against fp32, colour_augment on the device against the CPU on a
     batch that collate_views made (so the colour plan path is used);
  2. the seed recipe's step on one GPU: ViT-L/14 (build_training: fused AdamW, channels_last), 64 images
     of 2 x 224 + 6 x 98 px views, bf16 autocast, minimal_vit_inet.train_step, eager and compiled
     (model.backbone.compile(), warm-up cut off at --compile_limit_s): images/s, MFU (FLOPs of one step
     counted by FlopCounterMode, over the card's dense bf16 peak), peak memory, host syncs per step
     (target 0), and the shares of SIGReg, projector + probe and the colour stage, each timed alone;
  3. SIGReg forward + backward against the naive formula (bench/sigreg_bench.py's), D = 128, K = 1024,
     N = 512 and 8192: time, memory and their ratios;
  4. the data path: images/s of one DataLoader worker's work per core (decode, MultiCrop, collate_views)
     and the cores one GPU needs at the step rate of item 2;
  5. a real run: torchrun (NCCL) minimal_vit_inet.py on CIFAR-10 for a 4-minute budget (a 100-step
     calibration run sets the step count), then linear_probe.py (linear and k-NN top-1 on the test
     split) of the result and of the same network at random init.
Each item is a small function; a failure in one is reported in its row ("failed: ...") and the others
still run. Without CUDA the same code runs a reduced CPU form (CPU_SIZES: vit_tiny at 32/16 px, 8 images,
no compile, a few steps end to end, only when --cifar is given), which tests/test_gpu_check.py runs.

    python bench/gpu_check.py                              # CPU form: about 20 s on 2 cores
    python bench/gpu_check.py --cifar DIR_OR_TAR_GZ        # with CIFAR-10 JPEGs: train/<class>/*.jpg, test/...

On a lent GPU through the workplace's `device` tool (its README: /work/.library/device/README.md). The
machine has torch, torchvision and timm, and of `datasets`' needs pyarrow, pandas, fsspec, huggingface-hub,
requests, aiohttp, xxhash, pyyaml, tqdm, filelock and packaging, but not datasets, dill and multiprocess:
they travel as wheels (pure Python, 0.9 MB). Once, here, in the repository's root:

    echo /.whl/ >> .git/info/exclude && echo /.gpu_data/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    mkdir -p .gpu_data && cp ../shared/data/cifar10-jpg.tar.gz .gpu_data/ && cp -r ../shared/data/photos .gpu_data/

(23 MB in all with the CIFAR archive and the 48 photos; the working tree may carry 64 MiB.) Then one `run`
with carry [".whl", ".gpu_data"] and timeout_s 540 (the script stops itself at --budget_s 470 s), command:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py
    --cifar .gpu_data/cifar10-jpg.tar.gz --photos .gpu_data/photos 2>&1 | tee $OUT/stdout.log

(one line; --out defaults to $OUT there). The table comes back at the end of the output and as files.
To rerun only some items: --sections 2 5.
"""
import argparse
import contextlib
import datetime
import gc
import glob
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import host_syncs  # noqa: E402
import minimal_vit_inet as mvi  # noqa: E402
import sigreg  # noqa: E402
from sigreg_bench import naive_sigreg, saved_bytes  # noqa: E402


# -----------------------------------------------------------------------------
# Sizes: the GPU form measures the seed recipe; the CPU form runs the same code on tiny sizes

@dataclass
class Sizes:
    model: str  # item 2's backbone
    images: int  # images per step (per GPU)
    global_size: int
    local_size: int
    slices: int  # SIGReg slices in items 1 and 2
    check_shape: tuple  # item 1: (views, samples, dims) of SIGReg's input
    warmup: int  # steps before timing
    iters: int  # timed steps
    compile_backend: str  # "" = no compile
    sigreg_n: tuple  # item 3: sample counts
    sigreg_slices: int
    worker_images: int  # item 4: images per worker-rate measurement
    e2e_batch: int  # item 5: images per step
    e2e_calib_steps: int  # steps of the calibration run
    e2e_budget_s: float  # pretraining budget, calibration included
    e2e_max_steps: int
    probe_reserve_s: float  # time kept for item 5's two probes and the table


GPU_SIZES = Sizes(model="vit_large_patch14_224", images=64, global_size=224, local_size=98, slices=1024,
                  check_shape=(8, 512, 128), warmup=3, iters=10, compile_backend="inductor",
                  sigreg_n=(512, 8192), sigreg_slices=1024, worker_images=96, e2e_batch=512,
                  e2e_calib_steps=100, e2e_budget_s=240, e2e_max_steps=100_000, probe_reserve_s=80)
CPU_SIZES = Sizes(model="vit_tiny_patch16_224", images=8, global_size=32, local_size=16, slices=64,
                  check_shape=(2, 256, 32), warmup=1, iters=2, compile_backend="eager",
                  sigreg_n=(256, 1024), sigreg_slices=64, worker_images=16, e2e_batch=16,
                  e2e_calib_steps=0, e2e_budget_s=30, e2e_max_steps=3, probe_reserve_s=0)

# Item 5's run. At 32 px the GPU's step is far faster than the DataLoader workers can decode and crop
# (about 2,000 CIFAR images/s per core, item 4 measures it): the run is bound by the machine's 16 cores, so
# the backbone costs little GPU time either way. resnet18 is the network bench/quality_cifar10.py trains on
# the CPU (47.2% linear after 30 minutes against 23.8% at random init), so the GPU figures compare with those;
# timm's ViTs would see 32 px images as 2 x 2 patches of 16 px. Views and lr are that bench's (2 x 32 px +
# 4 x 16 px, lr 2e-3 for a short run); the batch is the seed's 512 and the projector its 2048 wide default.
E2E = dict(model="resnet18", global_size=32, local_size=16, n_local=4, lr=2e-3)
PEAK_BF16 = {"H100 SXM": 989.4e12, "H100 PCIe": 756e12, "H200": 989.4e12}  # dense, datasheets


def peak_flops(name: str):
    """Dense bf16 FLOP/s of the card from its name, or None. The H100 SXM calls itself 'H100 80GB HBM3'."""
    if "H200" in name and "NVL" not in name:
        return PEAK_BF16["H200"]
    if "H100" in name and "PCIe" in name:
        return PEAK_BF16["H100 PCIe"]
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return PEAK_BF16["H100 SXM"]
    return None


# -----------------------------------------------------------------------------
# Helpers: timing, inputs, batches

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup, iters, device) -> float:
    """Seconds per call of fn after `warmup` calls: CUDA events around `iters` calls on a GPU (the gaps
    between launches count), the host clock on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread once `seconds` have passed (bounds torch.compile's warm-up)."""
    def expire(signum, frame):
        raise TimeoutError(f"took over {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_jpegs(photos: str, n: int):
    """JPEG bytes of the photos in `photos` (about 500 px, ImageNet-like), else of n synthetic 500 x 375
    images (smooth colours plus noise); and a line saying which."""
    files = sorted(glob.glob(os.path.join(photos, "*.jpg"))) if photos else []
    if files:
        return [open(f, "rb").read() for f in files], f"{len(files)} photos from {photos}"
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(n):
        smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(smooth, dtype=np.int16) + rng.integers(-20, 21, (375, 500, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    return jpegs, f"{n} synthetic 500 x 375 JPEGs (no photos found)"


def decode(jpeg: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpeg))
    img.load()  # decoded here, as datasets' Image feature does in the worker
    return img


def make_batch(jpegs, cfg: mvi.Config, pin: bool):
    """A batch as a DataLoader worker makes it: MultiCrop on each decoded image, then collate_views
    (uint8 views, colour draws and colour plans); pinned for non-blocking copies on a GPU."""
    mc = mvi.MultiCrop(cfg.global_size, cfg.local_size, cfg.n_global, cfg.n_local, cfg.global_scale, cfg.local_scale)
    items = [(mc(decode(jpegs[i % len(jpegs)]), torch.Generator().manual_seed(i)), i % 1000)
             for i in range(cfg.batch_size)]
    views, labels = mvi.collate_views(items)
    if pin:
        views = [(x.pin_memory(), c.pin_memory(), (i.pin_memory(), n)) for x, c, (i, n) in views]
        labels = labels.pin_memory()
    return views, labels


def step_config(sz: Sizes) -> mvi.Config:
    """The seed recipe's settings for one GPU's share (64 of the global 512 images), at item 2's sizes."""
    return mvi.Config(model=sz.model, global_size=sz.global_size, local_size=sz.local_size, n_global=2, n_local=6,
                      batch_size=sz.images, num_slices=sz.slices, bf16=True)


class FixedSlices(sigreg.SIGReg):
    """SIGReg with given slices: a CUDA generator draws other numbers than the CPU's for the same seed."""

    def __init__(self, fixed: torch.Tensor):
        super().__init__(num_slices=fixed.shape[1])
        self.fixed = fixed

    def slices(self, dim, device, dtype=torch.float32):
        return self.fixed.to(device, dtype)


# -----------------------------------------------------------------------------
# 1. Correctness on the device

def check_correctness(device, sz: Sizes, jpegs):
    rows, values = [], {}
    # SIGReg's value and gradient: fp32 on the device against float64 on the CPU, same input and slices
    V, N, D = sz.check_shape
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(V, N, D, generator=gen, dtype=torch.float64) * 1.3 + 0.2
    slices = F.normalize(torch.randn(D, sz.slices, generator=gen, dtype=torch.float64), dim=0)

    def value_and_grad(x):
        x = x.detach().requires_grad_(True)
        loss = FixedSlices(slices)(x)
        loss.backward()
        return loss.detach().cpu().double(), x.grad.cpu().double()

    ref_value, ref_grad = value_and_grad(z)
    value, grad = value_and_grad(z.float().to(device))
    values["sigreg_value_rel_err"] = (abs(value - ref_value) / abs(ref_value)).item()
    values["sigreg_grad_rel_err"] = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    rows.append((f"SIGReg value, {device.type} fp32 vs CPU float64 ({V}x{N}x{D}, {sz.slices} slices)",
                 f"rel err {values['sigreg_value_rel_err']:.1e}"))
    rows.append(("SIGReg gradient, same", f"rel err (norm) {values['sigreg_grad_rel_err']:.1e}"))

    # bf16 autocast gives the fp32 value, in fp32 (as tests/test_sigreg.py checks on the CPU)
    z = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(10)).to(device)
    expected = sigreg.SIGReg(256)(z)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = sigreg.SIGReg(256)(z)
        from_bf16 = sigreg.SIGReg(256)(z.bfloat16())  # bf16 activations are upcast, not used as they are
    upcast = sigreg.SIGReg(256)(z.bfloat16().float())
    errors = [abs(got - expected) / expected, abs(from_bf16 - upcast) / upcast]
    values["bf16_autocast_rel_err"] = max(e.item() for e in errors)
    values["bf16_autocast_fp32_out"] = float(got.dtype == from_bf16.dtype == torch.float32)
    rows.append(("SIGReg under bf16 autocast vs fp32",
                 f"rel err {values['bf16_autocast_rel_err']:.1e}, result fp32: {bool(values['bf16_autocast_fp32_out'])}"))

    # the colour stage on the device against the CPU, on a batch made by collate_views (the plan path)
    views, _ = make_batch(jpegs, step_config(sz), pin=False)

    def colour_diff():
        worst, total, count = 0.0, 0.0, 0
        for x, c, plan in views:
            ref = mvi.colour_augment(x, c, plan)
            diff = (mvi.colour_augment(x.to(device), c.to(device), plan).cpu() - ref).abs()
            worst, total, count = max(worst, diff.max().item()), total + diff.sum().item(), count + diff.numel()
        return worst, total / count

    values["colour_max_abs_diff"], values["colour_mean_abs_diff"] = colour_diff()
    note = ""
    if device.type == "cuda":  # cuDNN may run the blur's convolutions in TF32; see how much of the gap that is
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            values["colour_max_abs_diff_no_tf32"], _ = colour_diff()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        note = f"; cuDNN TF32 off: max {values['colour_max_abs_diff_no_tf32']:.1e}"
    rows.append((f"colour_augment {device.type} vs CPU (8 views x {sz.images} images, normalised units)",
                 f"max abs diff {values['colour_max_abs_diff']:.1e}, mean {values['colour_mean_abs_diff']:.1e}{note}"))
    return rows, values


# -----------------------------------------------------------------------------
# 2. The seed recipe's training step on one GPU

def check_step(device, sz: Sizes, jpegs, compile_limit_s: float):
    rows, values = [], {}
    cfg = step_config(sz)
    torch.manual_seed(0)
    model, sig, optimizer, lrs = mvi.build_training(cfg, 1000, device)  # the script's own model and AdamW
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    batch = make_batch(jpegs, cfg, pin=device.type == "cuda")
    V, N = cfg.n_global + cfg.n_local, cfg.batch_size

    def step():
        mvi.train_step(model, optimizer, sig, batch, lrs, cfg, autocast, device)

    step()  # first call: AdamW state, per-device constants
    with FlopCounterMode(display=False) as counter:  # matrix products and convolutions of one step
        step()
    flops = counter.get_total_flops()
    peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    values["step_tflop"] = flops / 1e12
    rows.append((f"{cfg.model}, {N} images ({cfg.n_global}x{cfg.global_size} + {cfg.n_local}x{cfg.local_size} px), "
                 f"bf16: FLOPs per step", f"{flops / 1e12:.2f} TFLOP (FlopCounterMode: fwd + bwd)"))

    def measure(tag):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, 1, sz.iters, device)
        values[f"images_per_s_{tag}"] = N / seconds
        values[f"step_ms_{tag}"] = 1e3 * seconds
        mfu = f"MFU {100 * flops / seconds / peak:.1f}%" if peak else "MFU: unknown peak"
        if peak:
            values[f"mfu_{tag}"] = flops / seconds / peak
        mem = ""
        if device.type == "cuda":
            values[f"peak_mem_gib_{tag}"] = torch.cuda.max_memory_allocated() / 2**30
            mem = f", peak memory {values[f'peak_mem_gib_{tag}']:.1f} GiB"
        with host_syncs.count(device) as syncs:
            step()
        values[f"host_syncs_{tag}"] = len(syncs)
        rows.append((f"step, {tag}: images/s, MFU, memory, host syncs",
                     f"{N / seconds:.1f} img/s ({1e3 * seconds:.1f} ms/step), {mfu}{mem}, "
                     f"{len(syncs)} host syncs/step (target 0){': ' + '; '.join(sorted(set(syncs))) if syncs else ''}"))

    for _ in range(sz.warmup - 1):
        step()
    measure("eager")

    # the overhead's parts, alone, on the step's shapes
    emb = torch.randn(V * N, model.backbone.num_features, device=device, requires_grad=True)
    proj = torch.randn(V, N, cfg.proj_dim, device=device, requires_grad=True)
    on_device = [(x.to(device), c.to(device), plan) for x, c, plan in batch[0]]

    def heads():
        with autocast:
            (model.projector(emb).float().sum() + model.probe(emb).float().sum()).backward()

    def sigreg_alone():
        with autocast:
            sig(proj).backward()

    def colour():
        for x, c, plan in on_device:
            mvi.colour_augment(x, c, plan)

    parts = {name: timed(fn, 2, sz.iters, device) for name, fn in
             [("SIGReg fwd+bwd", sigreg_alone), ("projector + probe fwd+bwd", heads), ("colour stage", colour)]}

    # compiled, as the script does it; the warm-up (compilation) is cut off after compile_limit_s
    if sz.compile_backend:
        model.backbone.compile(backend=sz.compile_backend)
        start = time.perf_counter()
        try:
            with time_limit(compile_limit_s):
                for i in range(3):  # the two resolutions compile on the first calls
                    step()
                    sync(device)
                    print(f"  compiled warm-up step {i}: {time.perf_counter() - start:.0f} s", flush=True)
            values["compile_warmup_s"] = time.perf_counter() - start
            rows.append(("torch.compile warm-up (3 steps)", f"{values['compile_warmup_s']:.0f} s"))
            measure("compiled")
        except TimeoutError:
            rows.append(("step, compiled", f"skipped: the compile warm-up took over {compile_limit_s:.0f} s"))
    else:
        rows.append(("step, compiled", "skipped (CPU form)"))

    for (name, seconds), key in zip(parts.items(), ("sigreg", "heads", "colour")):
        values[f"part_ms_{key}"] = 1e3 * seconds
        shares = [f"{100 * seconds / values[f'step_ms_{tag}'] * 1e3:.1f}% of the {tag} step"
                  for tag in ("eager", "compiled") if f"step_ms_{tag}" in values]
        rate = f" ({N / seconds:.0f} img/s)" if key == "colour" else ""
        rows.append((f"share: {name} (alone, same shapes)", f"{1e3 * seconds:.2f} ms{rate} = {', '.join(shares)}"))
    return rows, values


# -----------------------------------------------------------------------------
# 3. SIGReg against the naive formula

def check_sigreg_cost(device, sz: Sizes):
    rows, values = [], {}
    D, K = 128, sz.sigreg_slices  # 128: the projector's output
    test = sigreg.EppsPulley()
    slices = F.normalize(torch.randn(D, K, generator=torch.Generator().manual_seed(0)), dim=0).to(device)

    def ours(z):
        return test(z, slices).mean()

    def naive(z):
        with torch.device(z.device):  # sigreg_bench's reference makes its knots on the default device
            return naive_sigreg(z, slices)

    for n in sz.sigreg_n:
        z = (torch.randn(n, D, generator=torch.Generator().manual_seed(n)) * 1.3 + 0.2).to(device)
        z.requires_grad_(True)
        cells = {}
        for name, fn in (("ours", ours), ("naive", naive)):
            value, kept = saved_bytes(fn, z)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            seconds = timed(lambda: fn(z).backward(), 1, sz.iters, device)
            peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
            cells[name] = dict(value=value.item(), ms=1e3 * seconds, kept_mb=kept / 2**20, peak_mb=peak / 2**20)
        o, v = cells["ours"], cells["naive"]
        values[f"sigreg_ms_{n}"], values[f"naive_ms_{n}"] = o["ms"], v["ms"]
        values[f"sigreg_rel_diff_{n}"] = abs(o["value"] - v["value"]) / abs(v["value"])
        peak = f", peak {o['peak_mb']:.0f} vs {v['peak_mb']:.0f} MB" if device.type == "cuda" else ""
        rows.append((f"SIGReg fwd+bwd vs naive, N={n}, D={D}, K={K}",
                     f"{o['ms']:.2f} vs {v['ms']:.2f} ms ({o['ms'] / v['ms']:.2f}x); kept for backward "
                     f"{o['kept_mb']:.1f} vs {v['kept_mb']:.1f} MB ({o['kept_mb'] / v['kept_mb']:.3f}x){peak}; "
                     f"values differ by {values[f'sigreg_rel_diff_{n}']:.0e}"))
    return rows, values


# -----------------------------------------------------------------------------
# 4. The data path: what one DataLoader worker does, per core

def worker_rate(jpegs, mc: mvi.MultiCrop, n: int) -> float:
    """Images per CPU-second of a worker's work on one thread: decode, MultiCrop, collate_views."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(2):  # warm-up
            mc(decode(jpegs[i % len(jpegs)]), torch.Generator().manual_seed(i))
        start = time.process_time()
        items = [(mc(decode(jpegs[i % len(jpegs)]), torch.Generator().manual_seed(i)), 0) for i in range(n)]
        for first in range(0, n, 32):
            mvi.collate_views(items[first:first + 32])
        return n / (time.process_time() - start)
    finally:
        torch.set_num_threads(threads)


def check_data_path(sz: Sizes, jpegs, source: str, cifar_jpegs, step_values):
    rows, values = [], {}
    seed = mvi.MultiCrop(sz.global_size, sz.local_size, 2, 6)
    values["worker_images_per_s_per_core"] = rate = worker_rate(jpegs, seed, sz.worker_images)
    rows.append((f"worker images/s per core, 2x{sz.global_size} + 6x{sz.local_size} px ({source})", f"{rate:.1f}"))
    step_rate = step_values.get("images_per_s_compiled") or step_values.get("images_per_s_eager")
    if step_rate:
        values["cores_per_gpu"] = step_rate / rate
        rows.append(("cores one GPU needs at item 2's best step rate",
                     f"{step_rate:.0f} / {rate:.1f} = {step_rate / rate:.1f} (this machine: {os.cpu_count()})"))
    else:
        rows.append(("cores one GPU needs", "no step rate (item 2 did not run)"))
    if cifar_jpegs:
        mc = mvi.MultiCrop(E2E["global_size"], E2E["local_size"], 2, E2E["n_local"])
        values["cifar_worker_images_per_s_per_core"] = r = worker_rate(cifar_jpegs, mc, 10 * sz.worker_images)
        rows.append((f"worker images/s per core, item 5's views on CIFAR-10 (2x32 + {E2E['n_local']}x16 px)",
                     f"{r:.0f}"))
    return rows, values


# -----------------------------------------------------------------------------
# 5. End to end: pretrain on CIFAR-10 with torchrun, then probe it and the same network at random init

def find_cifar(path: str, work: str):
    """CIFAR-10 JPEGs (train/<class>/*.jpg, test/<class>/*.jpg) from a folder or a .tar.gz (extracted into
    work); None when absent."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isdir(path):
        return path
    root = os.path.join(work, "cifar")
    with tarfile.open(path) as tar:
        tar.extractall(root, filter="data")
    return root


def save_for_datasets(root: str, work: str) -> str:
    """The image folder as a save_to_disk DatasetDict, which both scripts take as --dataset. Loading 60,000
    files as an imagefolder re-lists and hashes them in every process (about 100 s each on a 2-core CPU);
    load_from_disk reads this in a second. (datasets is what minimal_vit_inet.py itself loads data with.)"""
    import datasets
    datasets.disable_progress_bars()
    classes = sorted(os.listdir(os.path.join(root, "train")))
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=classes))
    splits = {}
    for split in ("train", "test"):
        files = sorted(glob.glob(os.path.join(root, split, "*", "*.jpg")))
        labels = [classes.index(os.path.basename(os.path.dirname(f))) for f in files]
        splits[split] = datasets.Dataset.from_dict(dict(image=files, label=labels), features=features)
    out = os.path.join(work, "cifar-datasets")
    datasets.DatasetDict(splits).save_to_disk(out)
    return out


def run_script(args: list, log: str, timeout: float, env: dict):
    """Run a script of the repository (output to log); raise with the log's end if it fails or overruns."""
    print("  + " + " ".join(args), flush=True)
    with open(log, "w") as f:
        try:
            code = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"killed after {timeout:.0f} s"
    if code:
        tail = open(log).read()[-600:].replace("\n", " / ")
        raise RuntimeError(f"{os.path.basename(args[-1] if args[0] == '-m' else args[0])} exit {code}: ...{tail}")


def pretrain_args(data, out_dir, steps, n_train, batch, workers, log_every) -> list:
    """About `steps` steps in as few epochs as hold them (an epoch is at most one pass), one warm-up (10%)
    and cosine schedule over all of them, as bench/quality_cifar10.py."""
    epochs = math.ceil(steps / (n_train // batch))
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "minimal_vit_inet.py",
            "--dataset", data, "--val_split", "", "--model", E2E["model"], "--global_size", str(E2E["global_size"]),
            "--local_size", str(E2E["local_size"]), "--n_local", str(E2E["n_local"]), "--batch_size", str(batch),
            "--lr", str(E2E["lr"]), "--workers", str(workers), "--epochs", str(epochs),
            "--steps_per_epoch", str(math.ceil(steps / epochs)), "--warmup_epochs", str(0.1 * epochs),
            "--log_every", str(log_every), "--out_dir", out_dir]


def last_record(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line][-1]


def check_end_to_end(device, sz: Sizes, root: str, work: str, out: str, budget_s: float):
    rows, values = [], {}
    start = time.perf_counter()
    data = save_for_datasets(root, work)
    n_train = len(glob.glob(os.path.join(root, "train", "*", "*.jpg")))
    batch = min(sz.e2e_batch, n_train // 2)
    workers = max(1, min(14, (os.cpu_count() or 2) - 2))  # the step's process needs a core, the rest decode
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1",
               HF_DATASETS_CACHE=os.path.join(work, "hf_cache"))

    # calibration (GPU form): a short run measures images/s, loader and epoch ends included
    steps = sz.e2e_max_steps
    if sz.e2e_calib_steps:
        calib = os.path.join(work, "calib")
        t0 = time.perf_counter()
        run_script(pretrain_args(data, calib, 50 * sz.e2e_calib_steps, n_train, batch, workers,
                                 sz.e2e_calib_steps // 2) + ["--stop_after", str(sz.e2e_calib_steps)],
                   os.path.join(out, "e2e_calib.log"), budget_s, env)
        calib_s = time.perf_counter() - t0
        img_s = last_record(calib)["images_per_s"]  # the second half: workers warm
        overhead_s = calib_s - sz.e2e_calib_steps * batch / img_s  # start-up, data, first batches, checkpoint
        left = budget_s - (time.perf_counter() - start) - overhead_s
        steps = max(10, min(sz.e2e_max_steps, int(left * img_s / batch)))
        values["e2e_calib_images_per_s"] = img_s
        rows.append(("calibration run", f"{img_s:.0f} img/s, start-up and checkpoint {overhead_s:.0f} s -> {steps} "
                                        f"steps of {batch} ({steps * batch / n_train:.1f} epochs) in {left:.0f} s"))

    # the run: torchrun, one process, NCCL on a GPU (gloo on the CPU)
    run_dir = os.path.join(work, "run")
    t0 = time.perf_counter()
    run_script(pretrain_args(data, run_dir, steps, n_train, batch, workers, max(1, min(50, steps // 4))),
               os.path.join(out, "e2e_pretrain.log"), budget_s + 120, env)
    values["e2e_pretrain_s"], values["e2e_steps"] = time.perf_counter() - t0, steps
    last = last_record(run_dir)
    values["e2e_final_loss"] = last["loss"]
    rows.append((f"pretraining {E2E['model']} on CIFAR-10 (torchrun, {'NCCL' if device.type == 'cuda' else 'gloo'}, "
                 f"2x32 + {E2E['n_local']}x16 px)",
                 f"{steps} steps of {batch} in {values['e2e_pretrain_s']:.0f} s, {last['images_per_s']:.0f} img/s at "
                 f"the end; loss {last['loss']:.4f} (invariance {last['invariance']:.4f}, sigreg {last['sigreg']:.3f})"))

    # probes: linear and k-NN top-1 on the test split, LeJEPA against the same network at random init
    accuracy = {}
    for name, backbone in (("lejepa", ["--checkpoint", os.path.join(run_dir, "ckpt.pt")]),
                           ("random", ["--model", E2E["model"], "--global_size", str(E2E["global_size"])])):
        probe_dir = os.path.join(work, f"probe-{name}")
        run_script(["linear_probe.py", *backbone, "--dataset", data, "--val_split", "test", "--workers", str(workers),
                    "--out_dir", probe_dir], os.path.join(out, f"e2e_probe_{name}.log"), 300, env)
        with open(os.path.join(probe_dir, "results.json")) as f:
            accuracy[name] = json.load(f)["results"][data]["all"]
        values[f"e2e_{name}_linear"], values[f"e2e_{name}_knn"] = accuracy[name]["linear"], accuracy[name]["knn"]
    gain = accuracy["lejepa"]["linear"] - accuracy["random"]["linear"]
    values["e2e_gain_linear"] = gain
    rows.append(("linear / k-NN top-1 on the test split",
                 f"LeJEPA {accuracy['lejepa']['linear']:.2f} / {accuracy['lejepa']['knn']:.2f}, random init "
                 f"{accuracy['random']['linear']:.2f} / {accuracy['random']['knn']:.2f} ({gain:+.2f} linear); "
                 f"whole item {time.perf_counter() - start:.0f} s"))
    return rows, values


# -----------------------------------------------------------------------------
# Main: run each item, keep going after a failure, write the table after each

def write_table(out: str, meta: dict, rows: list, values: dict) -> str:
    lines = [f"# gpu_check: {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, timm {meta['timm']}, {meta['cpus']} CPUs, {meta['form']} form, "
             f"{meta['elapsed_s']:.0f} s", "", "| item | measurement | result |", "| --- | --- | --- |"]
    lines += [f"| {item} | {what} | {result} |" for item, what, result in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, values=values), f, indent=1)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "out/gpu_check", help="gpu_check.md/.json, logs")
    p.add_argument("--cifar", default="", help="CIFAR-10 JPEG folder or .tar.gz (GPU default: .gpu_data/, "
                                               "then ../shared/data/); none: item 5 is skipped")
    p.add_argument("--photos", default=None, help="folder of *.jpg (default .gpu_data/photos or "
                                                  "../shared/data/photos); '' = synthetic images")
    p.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--budget_s", type=float, default=470.0, help="item 5's pretraining shrinks to end by then")
    p.add_argument("--compile_limit_s", type=float, default=150.0, help="compiled step skipped past this")
    args = p.parse_args()
    begin = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sz = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    if device.type != "cuda":
        torch.set_num_threads(1)  # tiny ops: on a busy shared CPU, threads waiting for each other cost 10x
    near = [os.path.join(ROOT, ".gpu_data"), os.path.join(ROOT, "..", "shared", "data")]
    if args.photos is None:
        args.photos = next((d for d in (os.path.join(n, "photos") for n in near) if os.path.isdir(d)), "")
    if not args.cifar and device.type == "cuda":  # the CPU form only runs item 5 on data it is given
        args.cifar = next((f for f in (os.path.join(n, "cifar10-jpg.tar.gz") for n in near) if os.path.exists(f)), "")
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                torch=torch.__version__, timm=mvi.timm.__version__, cpus=os.cpu_count(),
                form="GPU" if device.type == "cuda" else "CPU", elapsed_s=0.0)
    print(f"gpu_check on {meta['device']}, {meta['date']}, torch {meta['torch']}, {meta['form']} form", flush=True)
    jpegs, source = load_jpegs(args.photos, 48)
    work = tempfile.mkdtemp(prefix="gpu_check-")
    rows, values = [], {}

    def item(number, title, fn, *fn_args):
        if number not in args.sections:
            return
        print(f"[{time.perf_counter() - begin:5.0f} s] {number}. {title}", flush=True)
        t0 = time.perf_counter()
        try:
            new_rows, new_values = fn(*fn_args)
        except Exception as err:  # reported in the table; the other items still run
            traceback.print_exc()
            new_rows, new_values = [(title, f"failed: {type(err).__name__}: {str(err)[:300]}")], {}
        for what, result in new_rows:
            rows.append((number, what, result.replace("|", "/")))
            print(f"    {what}: {result}", flush=True)
        values.update(new_values)
        gc.collect()  # free this item's tensors (a failed item's too) before the next one needs the memory
        if device.type == "cuda":
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        meta["elapsed_s"] = time.perf_counter() - begin
        write_table(args.out, meta, rows, values)  # after each item: a killed run still leaves its rows
        print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)

    item(1, "correctness on the device", check_correctness, device, sz, jpegs)
    item(2, "the seed recipe's step on one GPU", check_step, device, sz, jpegs, args.compile_limit_s)
    item(3, "SIGReg vs the naive formula", check_sigreg_cost, device, sz)
    try:
        cifar = find_cifar(args.cifar, work)
    except Exception as err:
        cifar, args.cifar = None, f"{args.cifar} (unreadable: {type(err).__name__}: {err})"
    cifar_jpegs = [open(f, "rb").read() for f in sorted(glob.glob(os.path.join(cifar, "train", "*", "*.jpg")))
                   [:10 * sz.worker_images]] if cifar else []
    item(4, "the data path", check_data_path, sz, jpegs, source, cifar_jpegs, values)
    if 5 in args.sections:
        left = args.budget_s - (time.perf_counter() - begin) - sz.probe_reserve_s
        budget = min(sz.e2e_budget_s, left) if device.type == "cuda" else sz.e2e_budget_s
        if not cifar:
            rows.append((5, "end to end on CIFAR-10", f"skipped: no CIFAR-10 data (--cifar {args.cifar or 'not given'})"))
        elif budget < 60 and device.type == "cuda":
            rows.append((5, "end to end on CIFAR-10", f"skipped: {left:.0f} s left of --budget_s {args.budget_s:.0f}"))
        else:
            item(5, f"end to end on CIFAR-10 ({budget:.0f} s of pretraining)", check_end_to_end, device, sz, cifar,
                 work, args.out, budget)
    shutil.rmtree(work, ignore_errors=True)
    meta["elapsed_s"] = time.perf_counter() - begin
    print("\n" + write_table(args.out, meta, rows, values), flush=True)
    print(f"wrote {os.path.join(args.out, 'gpu_check.md')} and gpu_check.json", flush=True)


if __name__ == "__main__":
    main()
