"""GPU check: one command that measures on a lent GPU what the CPU could not (issue #11, section 3).

It ends within 8 minutes on one H100 (the lease is 15 minutes, the machine's start included) and prints
one table, also written to --out (gpu_check.md, gpu_check.json, and the logs of item 5) after every row:
  1. correctness on the device: SIGReg's value and gradient in fp32 against float64 on the CPU (same
     input, same slices); SIGReg under bf16 autocast against fp32; colour_augment on the device against
     the CPU, on a batch made by collate_views (one call per view size, as train_step makes them);
  2. the official recipe's step on one GPU: ViT-L/14 built by build_training (fused AdamW, channels_last),
     64 images of 2 x 224 + 6 x 98 px views, bf16 autocast, minimal_vit_inet.train_step, eager and compiled
     as --compile does it (the backbone in place and the colour stage; skipped when the warm-up passes
     --compile_limit_s): images/s, MFU (the step's FLOPs counted once by FlopCounterMode, over the card's
     dense bf16 peak), peak memory, host syncs per step (target 0). Then the backbone alone on the same
     views (forward, backward, fused AdamW on its parameters; the compiled one is the step's own compiled
     backbone: no second compilation), and where the step's time beyond it goes: the colour stage (eager
     and compiled), SIGReg and projector + probe, each timed alone on the step's shapes;
  3. SIGReg forward + backward, sigreg.py's direct form against the angle-addition recurrence
     (bench/sigreg_bench.py's), D = 128, K = 1024, N = 512 and 8192: time, memory, ratios;
  4. the data path: images/s per core of a DataLoader worker's work (decode, MultiCrop, collate_views),
     and the cores one GPU needs at item 2's step rate;
  5. a real run: torchrun (NCCL) minimal_vit_inet.py on CIFAR-10 for 4 minutes (a 100-step calibration run
     included; less if the items before took long, so that the whole ends by --budget_s), then
     linear_probe.py on the test split, linear and k-NN top-1, against the same network at random init.
A failure in an item is reported in its row ("failed: ...") and the other items still run.
Without CUDA the same code runs a reduced CPU form (CPU_SIZES: vit_tiny at 32/16 px, 8 images, torch.compile
with the "eager" backend, 3 steps end to end when --cifar is given); tests/test_gpu_check.py runs it.

    python bench/gpu_check.py                          # CPU form: about 10 s on 2 cores, item 5 skipped
    python bench/gpu_check.py --cifar DIR_OR_TAR_GZ    # CIFAR-10 JPEGs: train/<class>/*.jpg, test/...

On a lent GPU, through the workplace's `device` tool (/work/.library/device/README.md). Its machine has
torch, torchvision, timm and most of what `datasets` needs (pyarrow, pandas, fsspec, huggingface-hub,
requests, aiohttp, xxhash, pyyaml, tqdm, filelock, packaging), but not datasets, dill and multiprocess:
those travel as wheels (pure Python, 0.9 MB). Once, here, in the repository's root:

    echo /.whl/ >> .git/info/exclude && echo /.gpu_data/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    mkdir -p .gpu_data && cp -r ../shared/data/cifar10-jpg.tar.gz ../shared/data/photos .gpu_data/

(23 MB in all: the archive 20.1 MB, the 48 photos 2.3 MB, the wheels 0.9 MB; a call carries at most
64 MiB.) Then one `run`, with carry [".whl", ".gpu_data"] and timeout_s 540 (the script ends by --budget_s,
470 s) and this command, on one line (--out defaults to $OUT there, the data paths to .gpu_data/):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py 2>&1
    | tee $OUT/stdout.log

datasets 5.2.0 declares pyarrow>=24, fsspec<=2026.9.0 and huggingface-hub>=1.31 (1.33.0 was seen there);
--no-deps does not check them. If datasets cannot be imported there, items 1-4 still run (minimal_vit_inet
gets a stub) and item 5's row says why. Rerun only some items with --sections, e.g. --sections 2 5.
"""
import argparse
import contextlib
import datetime
import functools
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
import types
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
try:  # minimal_vit_inet imports datasets; only item 5 uses it, so items 1-4 run without it (a stub)
    import datasets
    NO_DATASETS = ""
except Exception as err:  # e.g. the wheels did not install on the GPU machine
    NO_DATASETS = f"{type(err).__name__}: {err}"
    sys.modules["datasets"] = types.ModuleType("datasets")
import host_syncs  # noqa: E402
import minimal_vit_inet as mvi  # noqa: E402
import sigreg  # noqa: E402
from sigreg_bench import recurrence_sigreg, saved_bytes  # noqa: E402
from train_step_bench import backbone_alone  # noqa: E402


# -----------------------------------------------------------------------------
# Sizes: the GPU form measures the official recipe; the CPU form runs the same code small

@dataclass
class Sizes:
    model: str  # item 2's backbone
    images: int  # item 2: images per step (one GPU's share)
    global_size: int  # px
    local_size: int  # px
    slices: int  # SIGReg slices in items 1 and 2
    check_shape: tuple  # item 1: (views, samples, dims) of SIGReg's input
    warmup: int  # item 2: steps before timing
    iters: int  # timed calls
    compile_backend: str  # item 2: torch.compile backend
    sigreg_n: tuple  # item 3: samples
    sigreg_slices: int
    worker_images: int  # item 4: images per measurement
    e2e_batch: int  # item 5: images per step
    e2e_calib_steps: int  # steps of the calibration run (0: none, e2e_max_steps are run)
    e2e_budget_s: float  # pretraining time, calibration included
    e2e_max_steps: int
    probe_reserve_s: float  # kept for item 5's two probes when its budget is cut to fit --budget_s


GPU_SIZES = Sizes(model="vit_large_patch14_224", images=64, global_size=224, local_size=98, slices=1024,
                  check_shape=(8, 512, 128), warmup=3, iters=10, compile_backend="inductor",
                  sigreg_n=(512, 8192), sigreg_slices=1024, worker_images=192, e2e_batch=512,
                  e2e_calib_steps=100, e2e_budget_s=240, e2e_max_steps=100_000, probe_reserve_s=80)
CPU_SIZES = Sizes(model="vit_tiny_patch16_224", images=8, global_size=32, local_size=16, slices=64,
                  check_shape=(2, 256, 32), warmup=1, iters=2, compile_backend="eager",  # dynamo only
                  sigreg_n=(256, 1024), sigreg_slices=64, worker_images=16, e2e_batch=16,
                  e2e_calib_steps=0, e2e_budget_s=30, e2e_max_steps=3, probe_reserve_s=0)

# Item 5's run. At 32 px an H100 steps through a small network far faster than DataLoader workers decode
# and crop CIFAR images (about 2,000 images/s per core on the 2-core CPU here; item 4 measures it there),
# so the run is bound by the machine's 16 cores and a larger backbone would cost little extra time. We keep
# resnet18 because bench/quality_cifar10.py trains it on the CPU (47.2% linear after 30 minutes, 23.8% at
# random init): the GPU figures compare with those. timm's ViTs would cut a 32 px image into 2 x 2 patches
# of 16 px. The views and lr are that bench's (2 x 32 + 4 x 16 px, lr 2e-3: a short run wants a higher rate
# than the official 5e-4 for 100 epochs); the batch is the official recipe's 512, the projector its 2048-wide
# default.
# Another backbone: --e2e_model (e.g. resnet50, which might learn more in the same loader-bound time).
E2E = dict(model="resnet18", global_size=32, local_size=16, n_local=4, lr=2e-3)
PEAK_BF16 = {"H100 SXM": 989.4e12, "H100 PCIe": 756e12, "H200": 989.4e12}  # dense, datasheets


def peak_flops(name: str):
    """Dense bf16 FLOP/s of a card from its name, or None. An H100 SXM calls itself 'H100 80GB HBM3'."""
    if "H200" in name and "NVL" not in name:
        return PEAK_BF16["H200"]
    if "H100" in name and "PCIe" in name:
        return PEAK_BF16["H100 PCIe"]
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return PEAK_BF16["H100 SXM"]
    return None


class Table:
    """The rows (item, measurement, result) and the numbers behind them; written to out after every row, so
    a run cut short still leaves what it measured."""

    def __init__(self, out: str, meta: dict):
        self.out, self.meta, self.rows, self.values, self.item = out, meta, [], {}, 0
        self.begin = time.perf_counter()

    def add(self, what: str, result: str, **values):
        self.rows.append((self.item, what, result.replace("|", "/").replace("\n", " ")))  # one table line
        self.values.update(values)
        print(f"    {what}: {result}", flush=True)
        self.write()

    def write(self) -> str:
        self.meta["elapsed_s"] = round(time.perf_counter() - self.begin, 1)
        m = self.meta
        lines = [f"# gpu_check: {m['device']}, {m['date']}", "", f"torch {m['torch']}, timm {m['timm']}, "
                 f"{m['cpus']} CPUs, {m['form']} form, {m['elapsed_s']:.0f} s", "",
                 "| item | measurement | result |", "| --- | --- | --- |"]
        text = "\n".join(lines + [f"| {i} | {what} | {result} |" for i, what, result in self.rows]) + "\n"
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:
            f.write(text)
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(dict(meta=m, rows=self.rows, values=self.values), f, indent=1)
        return text


# -----------------------------------------------------------------------------
# Helpers: timing, images, batches

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, iters: int, device) -> float:
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


class OverTime(BaseException):
    """Raised by time_limit. Not an Exception: torch.compile catches those and goes on compiling."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise OverTime in the main thread once `seconds` have passed."""
    def expire(signum, frame):
        raise OverTime(f"over {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def peak_memory_start(device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_memory_mib(device, start: int) -> float:
    """Peak allocated since peak_memory_start, above what was allocated then (0 on the CPU)."""
    return (torch.cuda.max_memory_allocated() - start) / 2**20 if device.type == "cuda" else 0.0


def load_jpegs(photos: str, n: int):
    """JPEG bytes of the photos in `photos` (about 500 px, like ImageNet's), else of n synthetic 500 x 375
    images (smooth colours and noise); and a few words saying which."""
    files = sorted(glob.glob(os.path.join(photos, "*.jpg"))) if photos else []
    if files:
        return [open(f, "rb").read() for f in files], f"{len(files)} photos"
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((500, 375), Image.BICUBIC), dtype=np.int16)
        pixels += rng.integers(-20, 21, (375, 500, 3), dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    return jpegs, f"{n} synthetic 500 x 375 JPEGs"


def decode(jpeg: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpeg))
    img.load()  # decoded now, as datasets' Image feature does in the worker
    return img


def step_config(sz: Sizes) -> mvi.Config:
    """The official recipe's settings for one GPU's share of the batch (64 of 512 images), at sz's sizes."""
    return mvi.Config(model=sz.model, global_size=sz.global_size, local_size=sz.local_size, n_global=2,
                      n_local=6, batch_size=sz.images, num_slices=sz.slices, bf16=True)


def make_batch(jpegs, cfg: mvi.Config, pin: bool):
    """A batch as a DataLoader worker makes it: MultiCrop on each decoded image, then collate_views (per view
    size: uint8 views and their colour draws); pinned for non-blocking copies to a GPU, as pin_memory=True."""
    mc = mvi.MultiCrop(cfg)
    torch.manual_seed(0)  # MultiCrop draws from the global RNG, as ViewsDataset seeds it
    items = [(mc(decode(jpegs[i % len(jpegs)])), i % 1000) for i in range(cfg.batch_size)]
    views, labels = mvi.collate_views(items)
    if pin:
        views = [(x.pin_memory(), c.pin_memory()) for x, c in views]
        labels = labels.pin_memory()
    return views, labels


class FixedSlices(sigreg.SIGReg):
    """SIGReg with given slices: for one seed, a CUDA generator draws other numbers than the CPU's."""

    def __init__(self, fixed: torch.Tensor):
        super().__init__(num_slices=fixed.shape[1])
        self.fixed = fixed

    def slices(self, dim, device, dtype=torch.float32):
        return self.fixed.to(device, dtype)


# -----------------------------------------------------------------------------
# 1. Correctness on the device

def check_correctness(table: Table, device, sz: Sizes, jpegs):
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
    err_value = (abs(value - ref_value) / abs(ref_value)).item()
    err_grad = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    table.add(f"SIGReg value, {device.type} fp32 vs CPU float64 ({V}x{N}x{D}, {sz.slices} slices)",
              f"rel err {err_value:.1e}", sigreg_value_rel_err=err_value)
    table.add("SIGReg gradient, same", f"rel err (of the norm) {err_grad:.1e}", sigreg_grad_rel_err=err_grad)

    # bf16 autocast gives the fp32 value, in fp32 (tests/test_sigreg.py checks it on the CPU)
    z = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(10)).to(device)
    expected = sigreg.SIGReg(256)(z)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = sigreg.SIGReg(256)(z)
        from_bf16 = sigreg.SIGReg(256)(z.bfloat16())  # bf16 activations are upcast, not used as they are
    upcast = sigreg.SIGReg(256)(z.bfloat16().float())
    err = max((abs(got - expected) / expected).item(), (abs(from_bf16 - upcast) / upcast).item())
    fp32 = got.dtype == from_bf16.dtype == torch.float32
    table.add("SIGReg under bf16 autocast vs fp32", f"rel err {err:.1e}, result in fp32: {fp32}",
              bf16_autocast_rel_err=err, bf16_autocast_fp32_out=float(fp32))

    # the colour stage on the device against the CPU, on a batch from collate_views: one call per view size
    groups, _ = make_batch(jpegs, step_config(sz), pin=False)

    def colour_diff():
        worst, total, count = 0.0, 0.0, 0
        for x, c in groups:
            got = mvi.colour_augment(x.to(device), c.to(device)).cpu()
            diff = (got - mvi.colour_augment(x, c)).abs()
            worst = max(worst, diff.max().item())
            total, count = total + diff.sum().item(), count + diff.numel()
        return worst, total / count

    worst, mean = colour_diff()
    note, numbers = "", dict(colour_max_abs_diff=worst, colour_mean_abs_diff=mean)
    if device.type == "cuda":  # cuDNN may run the blur's convolutions in TF32: how much of the gap is that
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            numbers["colour_max_abs_diff_no_tf32"], _ = colour_diff()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        note = f"; cuDNN TF32 off: max {numbers['colour_max_abs_diff_no_tf32']:.1e}"
    table.add(f"colour_augment {device.type} vs CPU ({len(groups)} calls, one per view size: 8 views x "
              f"{sz.images} images, normalised values)",
              f"max abs diff {worst:.1e}, mean {mean:.1e}{note}", **numbers)


# -----------------------------------------------------------------------------
# 2. The official recipe's training step on one GPU, and the backbone alone

PARTS = {"sigreg": "SIGReg fwd+bwd", "heads": "projector + probe fwd+bwd",
         "colour": "colour stage (one call per view size)", "colour_compiled": "colour stage, compiled"}


def count_flops(step) -> float:
    """FLOPs of one call of step: its matrix products, convolutions and attention (FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure_step(table: Table, tag: str, what: str, step, flops: float, images: int, sz: Sizes, device):
    """Images/s, MFU and peak memory over sz.iters steps, then the host syncs of one more step."""
    peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    start = peak_memory_start(device)
    seconds = timed(step, 1, sz.iters, device)
    memory = peak_memory_mib(device, start) / 1024
    with host_syncs.count(device) as syncs:
        step()
    mfu = f"MFU {100 * flops / seconds / peak:.1f}%" if peak else "MFU: unknown peak"
    mem = f", peak memory {memory:.1f} GiB" if device.type == "cuda" else ""
    which = f": {'; '.join(sorted(set(syncs)))}" if syncs else ""
    numbers = {f"images_per_s_{tag}": images / seconds, f"step_ms_{tag}": 1e3 * seconds,
               f"host_syncs_{tag}": len(syncs), f"peak_mem_gib_{tag}": memory}
    if peak:
        numbers[f"mfu_{tag}"] = flops / seconds / peak
    table.add(f"{what}: images/s, MFU, memory, host syncs per step",
              f"{images / seconds:.1f} img/s ({1e3 * seconds:.1f} ms/step), {mfu}{mem}, "
              f"{len(syncs)} host syncs (target 0){which}", **numbers)


def time_heads(model, sig, cfg, autocast, sz: Sizes, device) -> dict:
    """Seconds of SIGReg and of projector + probe (forward + backward; eager under --compile too), each alone
    on the step's shapes, as bench/train_step_bench.py times them."""
    V, N = cfg.n_global + cfg.n_local, cfg.batch_size
    emb = torch.randn(V * N, model.backbone.num_features, device=device, requires_grad=True)
    proj = torch.randn(V, N, cfg.proj_dim, device=device, requires_grad=True)

    def sigreg_alone():
        with autocast:
            sig(proj).backward()

    def heads():  # the projector sees every view, the probe the global views (as LeJEPA.forward)
        with autocast:
            probe = model.probe(emb[:cfg.n_global * N])
            (model.projector(emb).float().sum() + probe.float().sum()).backward()

    return dict(sigreg=timed(sigreg_alone, 2, sz.iters, device), heads=timed(heads, 2, sz.iters, device))


def time_colour(batch, augment, sz: Sizes, device) -> float:
    """Seconds of the colour stage as train_step runs it: augment once per view size, on the device."""
    groups = [(x.to(device), c.to(device)) for x, c in batch[0]]

    def colour():
        for x, c in groups:
            augment(x, c)
    return timed(colour, 2, sz.iters, device)


def check_step(table: Table, device, sz: Sizes, jpegs, compile_limit_s: float):
    cfg = step_config(sz)
    torch.manual_seed(0)
    model, sig, optimizer = mvi.build_training(cfg, 1000, device)  # the script's model and AdamW
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    batch = make_batch(jpegs, cfg, pin=device.type == "cuda")
    backbone_step = backbone_alone(model, batch, cfg, autocast, device)

    def step():
        mvi.train_step(model, optimizer, sig, batch, cfg, autocast, device)

    step()  # the first calls make AdamW's state and the per-device constants
    backbone_step()
    flops, backbone_flops = count_flops(step), count_flops(backbone_step)
    table.add(f"{cfg.model}, {cfg.batch_size} images (2x{cfg.global_size} + 6x{cfg.local_size} px), bf16: "
              f"FLOPs per step", f"{flops / 1e12:.3f} TFLOP, the backbone alone {backbone_flops / 1e12:.3f} "
              f"(FlopCounterMode around one train_step, one backbone step)",
              step_tflop=flops / 1e12, backbone_tflop=backbone_flops / 1e12)
    for _ in range(sz.warmup - 2):
        step()
    measure_step(table, "eager", "step, eager", step, flops, cfg.batch_size, sz, device)
    measure_step(table, "backbone_eager", "backbone alone, eager", backbone_step, backbone_flops,
                 cfg.batch_size, sz, device)
    parts = time_heads(model, sig, cfg, autocast, sz, device)
    parts["colour"] = time_colour(batch, mvi.colour_augment, sz, device)
    colour_compiled = check_compiled(table, model, cfg, step, backbone_step, flops, backbone_flops, batch,
                                     sz, device, compile_limit_s)
    if colour_compiled is not None:
        parts["colour_compiled"] = colour_compiled
    report_parts(table, parts, cfg)


def check_compiled(table: Table, model, cfg, step, backbone_step, flops, backbone_flops, batch, sz: Sizes,
                   device, limit_s: float):
    """The step as --compile runs it (the backbone compiled in place, the colour stage through mvi.compiled),
    with sz's backend; then the backbone alone, which calls the same compiled backbone. -> seconds of the
    compiled colour stage alone, or None when the warm-up took over limit_s or failed."""
    script_compiled = mvi.compiled
    # mvi.compiled with this item's backend (the GPU form's inductor is the script's own)
    mvi.compiled = functools.cache(functools.partial(torch.compile, fullgraph=True, dynamic=False,
                                                     backend=sz.compile_backend))
    model.backbone.compile(backend=sz.compile_backend)
    cfg.compile = True  # train_step now calls mvi.compiled(mvi.colour_augment)
    graphs = torch._dynamo.utils.counters["stats"]
    try:
        start, before = time.perf_counter(), graphs["unique_graphs"]
        with time_limit(limit_s):
            for i in range(3):  # each view size compiles at its first call (backbone and colour stage)
                step()
                sync(device)
                print(f"    compiled warm-up step {i}: {time.perf_counter() - start:.0f} s", flush=True)
            warmup_s, compiled = time.perf_counter() - start, graphs["unique_graphs"] - before
            backbone_step()  # the step's graphs: nothing new to compile
            sync(device)
        again = graphs["unique_graphs"] - before - compiled
        table.add(f"torch.compile warm-up, backend {sz.compile_backend} (3 steps)",
                  f"{warmup_s:.0f} s, {compiled} graphs; the backbone alone then compiled {again} more "
                  f"({time.perf_counter() - start - warmup_s:.1f} s)", compile_warmup_s=warmup_s,
                  compile_graphs=compiled, compile_graphs_backbone_alone=again)
        measure_step(table, "compiled", "step, compiled", step, flops, cfg.batch_size, sz, device)
        measure_step(table, "backbone_compiled", "backbone alone, compiled", backbone_step, backbone_flops,
                     cfg.batch_size, sz, device)
        return time_colour(batch, mvi.compiled(mvi.colour_augment), sz, device)
    except OverTime:
        table.add(f"step, compiled (backend {sz.compile_backend})",
                  f"skipped: its warm-up took over {limit_s:.0f} s")
    except Exception as err:  # the eager figures stay
        table.add(f"step, compiled (backend {sz.compile_backend})",
                  f"failed: {type(err).__name__}: {str(err)[:300]}")
    finally:
        mvi.compiled, cfg.compile = script_compiled, False
    return None


def report_parts(table: Table, parts: dict, cfg):
    """Each part as a share of the eager and the compiled step; then, in one row, the step's time beyond the
    backbone alone (step ms - backbone ms) and how much of it each part explains."""
    v = table.values
    tags = [tag for tag in ("eager", "compiled") if f"step_ms_{tag}" in v]
    for key, seconds in parts.items():
        shares = [f"{100 * seconds / v[f'step_ms_{tag}'] * 1e3:.1f}% of the {tag} step" for tag in tags]
        rate = f" ({cfg.batch_size / seconds:.0f} img/s)" if key.startswith("colour") else ""
        table.add(f"share: {PARTS[key]}, alone on the step's shapes",
                  f"{1e3 * seconds:.2f} ms{rate} = {', '.join(shares)}", **{f"part_ms_{key}": 1e3 * seconds})
    cells, numbers = [], {}
    for tag in tags:
        if f"step_ms_backbone_{tag}" not in v:
            continue
        step_ms, backbone_ms = v[f"step_ms_{tag}"], v[f"step_ms_backbone_{tag}"]
        gap = step_ms - backbone_ms
        colour = "colour_compiled" if tag == "compiled" else "colour"
        pieces = [(name, 1e3 * parts[key]) for key, name in ((colour, "colour"), ("sigreg", "SIGReg"),
                                                             ("heads", "projector + probe")) if key in parts]
        rest = gap - sum(ms for _, ms in pieces)
        pieces.append(("the rest (loss, AdamW on the heads, copies, launch gaps)", rest))
        shares = ", ".join(f"{name} {ms:.1f} ms" + (f" ({100 * ms / gap:.0f}%)" if gap > 0 else "")
                           for name, ms in pieces)
        cells.append(f"{tag}: {step_ms:.1f} - {backbone_ms:.1f} = {gap:.1f} ms: {shares}")
        numbers[f"gap_ms_{tag}"] = gap
    if cells:
        table.add("the step's time beyond the backbone alone (step - backbone), by part", "; ".join(cells),
                  **numbers)


# -----------------------------------------------------------------------------
# 3. SIGReg: sigreg.py's direct form against the recurrence

def check_sigreg_cost(table: Table, device, sz: Sizes):
    D, K = 128, sz.sigreg_slices  # D: the projector's output
    test = sigreg.EppsPulley()
    slices = F.normalize(torch.randn(D, K, generator=torch.Generator().manual_seed(0)), dim=0).to(device)

    def ours(z):  # sigreg.py: the direct form
        return test(z @ slices).mean()

    def recurrence(z):  # the angle-addition recurrence sigreg.py left (issue #18)
        return recurrence_sigreg(z, slices)

    for n in sz.sigreg_n:
        z = (torch.randn(n, D, generator=torch.Generator().manual_seed(n)) * 1.3 + 0.2).to(device)
        z.requires_grad_(True)
        cell = {}
        for name, fn in (("ours", ours), ("recurrence", recurrence)):
            value, kept = saved_bytes(fn, z)  # bytes autograd keeps for backward
            start = peak_memory_start(device)
            seconds = timed(lambda: fn(z).backward(), 1, sz.iters, device)
            cell[name] = dict(value=value.item(), ms=1e3 * seconds, kept=kept / 2**20,
                              peak=peak_memory_mib(device, start))
        o, v = cell["ours"], cell["recurrence"]
        diff = abs(o["value"] - v["value"]) / abs(v["value"])
        peak = f", peak {o['peak']:.0f} vs {v['peak']:.0f} MiB" if device.type == "cuda" else ""
        table.add(f"SIGReg fwd+bwd vs recurrence, N={n}, D={D}, K={K}",
                  f"{o['ms']:.2f} vs {v['ms']:.2f} ms ({o['ms'] / v['ms']:.2f}x); kept for backward "
                  f"{o['kept']:.1f} vs {v['kept']:.1f} MiB ({o['kept'] / v['kept']:.3f}x){peak}; "
                  f"values differ by {diff:.1e}",
                  **{f"sigreg_ms_{n}": o["ms"], f"recurrence_ms_{n}": v["ms"],
                     f"sigreg_peak_mib_{n}": o["peak"], f"recurrence_peak_mib_{n}": v["peak"],
                     f"sigreg_rel_diff_{n}": diff})


# -----------------------------------------------------------------------------
# 4. The data path: a DataLoader worker's work, per core

def worker_rate(jpegs, mc: mvi.MultiCrop, n: int) -> float:
    """Images per CPU-second of a worker's work on one thread: decode, MultiCrop, collate_views."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(2):  # warm-up
            mc(decode(jpegs[i]))
        start = time.process_time()
        items = [(mc(decode(jpegs[i % len(jpegs)])), 0) for i in range(n)]
        for first in range(0, n, 32):
            mvi.collate_views(items[first:first + 32])
        return n / (time.process_time() - start)
    finally:
        torch.set_num_threads(threads)


def check_data_path(table: Table, sz: Sizes, jpegs, source: str, cifar_jpegs):
    mc = mvi.MultiCrop(mvi.Config(global_size=sz.global_size, local_size=sz.local_size))
    rate = worker_rate(jpegs, mc, sz.worker_images)
    table.add(f"worker images/s per core, 2x{sz.global_size} + 6x{sz.local_size} px views of {source}",
              f"{rate:.1f}", worker_images_per_s_per_core=rate)
    step_rate = table.values.get("images_per_s_compiled") or table.values.get("images_per_s_eager")
    if step_rate:
        table.add("cores one GPU needs at item 2's best step rate",
                  f"{step_rate:.0f} / {rate:.1f} = {step_rate / rate:.1f} (this machine: {os.cpu_count()})",
                  cores_per_gpu=step_rate / rate)
    else:
        table.add("cores one GPU needs", "unknown: item 2 gave no step rate")
    if cifar_jpegs:
        mc = mvi.MultiCrop(mvi.Config(global_size=E2E["global_size"], local_size=E2E["local_size"],
                                      n_local=E2E["n_local"]))
        rate = worker_rate(cifar_jpegs, mc, len(cifar_jpegs))
        table.add(f"worker images/s per core, item 5's views of CIFAR-10 (2x32 + {E2E['n_local']}x16 px)",
                  f"{rate:.0f}", cifar_worker_images_per_s_per_core=rate)


# -----------------------------------------------------------------------------
# 5. End to end: pretrain on CIFAR-10 with torchrun, then probe it and the same network at random init

def find_cifar(path: str, work: str):
    """CIFAR-10 JPEGs (train/<class>/*.jpg, test/<class>/*.jpg): a folder, or a .tar.gz extracted into
    work; None when there is none."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isdir(path):
        return path
    root = os.path.join(work, "cifar")
    with tarfile.open(path) as tar:
        tar.extractall(root, filter="data")
    return root


def save_for_datasets(root: str, work: str) -> str:
    """The image folder as a save_to_disk DatasetDict, which both scripts take as --dataset: loading 60,000
    files as an imagefolder lists and hashes them again in every process (about 100 s each on the 2-core
    CPU here), load_from_disk reads this in a second. (datasets is minimal_vit_inet.py's data library.)"""
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
    """Run python with args in the repository (output to log); raise with the log's end on failure."""
    print("    + " + " ".join(args), flush=True)
    with open(log, "w") as f:
        try:
            code = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"killed after {timeout:.0f} s"
    if code:
        tail = open(log).read()[-500:].replace("\n", " / ")
        raise RuntimeError(f"exit {code}, {os.path.basename(log)} ends: ...{tail}")


def pretrain_args(model: str, data: str, out_dir: str, steps: int, n_train: int, batch: int, workers: int,
                  log_every: int) -> list:
    """torchrun, one process: about `steps` steps in as few epochs as hold them (an epoch is at most one
    pass), one warm-up (10%) + cosine schedule over them all, as bench/quality_cifar10.py does."""
    epochs = math.ceil(steps / (n_train // batch))
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "minimal_vit_inet.py",
            "--dataset", data, "--val_split", "", "--model", model, "--global_size", str(E2E["global_size"]),
            "--local_size", str(E2E["local_size"]), "--n_local", str(E2E["n_local"]),
            "--batch_size", str(batch), "--lr", str(E2E["lr"]), "--workers", str(workers),
            "--epochs", str(epochs), "--steps_per_epoch", str(math.ceil(steps / epochs)),
            "--warmup_epochs", str(0.1 * epochs), "--log_every", str(log_every), "--out_dir", out_dir]


def last_record(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line][-1]


def check_end_to_end(table: Table, device, sz: Sizes, model: str, root: str, work: str, budget_s: float):
    start = time.perf_counter()
    data = save_for_datasets(root, work)
    n_train = len(glob.glob(os.path.join(root, "train", "*", "*.jpg")))
    batch = min(sz.e2e_batch, n_train // 2)
    workers = max(1, min(14, (os.cpu_count() or 2) - 2))  # the training process keeps a core or two
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1",
               HF_DATASETS_CACHE=os.path.join(work, "hf_cache"))
    if device.type != "cuda":
        env["OMP_NUM_THREADS"] = "1"  # as this process (main()): a busy 2-core CPU

    # calibration (GPU form): a short run measures images/s, the loader and an epoch's end included
    steps = sz.e2e_max_steps
    if sz.e2e_calib_steps:
        calib, n = os.path.join(work, "calib"), sz.e2e_calib_steps
        t0 = time.perf_counter()
        run_script(pretrain_args(model, data, calib, 50 * n, n_train, batch, workers, n // 2)
                   + ["--stop_after", str(n)], os.path.join(table.out, "e2e_calib.log"), budget_s, env)
        img_s = last_record(calib)["images_per_s"]  # over its second half: workers warm
        overhead_s = time.perf_counter() - t0 - n * batch / img_s  # start-up, first batches, checkpoint
        left = budget_s - (time.perf_counter() - start) - overhead_s
        steps = min(sz.e2e_max_steps, max(10, int(left * img_s / batch)))
        table.add("calibration run", f"{img_s:.0f} img/s, {overhead_s:.0f} s of start-up and checkpoint -> "
                                     f"{steps} steps ({steps * batch / n_train:.1f} epochs) in {left:.0f} s",
                  e2e_calib_images_per_s=img_s)

    # the run: torchrun, one process (NCCL on a GPU, gloo on the CPU)
    run_dir = os.path.join(work, "run")
    t0 = time.perf_counter()
    log_every = max(1, min(50, steps // 4))
    run_script(pretrain_args(model, data, run_dir, steps, n_train, batch, workers, log_every),
               os.path.join(table.out, "e2e_pretrain.log"), budget_s + 120, env)
    seconds, last = time.perf_counter() - t0, last_record(run_dir)
    table.add(f"pretraining {model} on CIFAR-10, torchrun ({'NCCL' if device.type == 'cuda' else 'gloo'}), "
              f"2x32 + {E2E['n_local']}x16 px, batch {batch}",
              f"{steps} steps in {seconds:.0f} s, {last['images_per_s']:.0f} img/s at the end; "
              f"loss {last['loss']:.4f} (invariance {last['invariance']:.4f}, sigreg {last['sigreg']:.3f})",
              e2e_steps=steps, e2e_pretrain_s=seconds, e2e_final_loss=last["loss"])

    # probes: linear and k-NN top-1 on the test split, for LeJEPA and the same network at random init
    linear = {}
    for name, title, backbone in (
            ("lejepa", "LeJEPA", ["--checkpoint", os.path.join(run_dir, "ckpt.pt")]),
            ("random", "random init", ["--model", model, "--global_size", str(E2E["global_size"])])):
        probe_dir = os.path.join(work, f"probe-{name}")
        t0 = time.perf_counter()
        run_script(["linear_probe.py", *backbone, "--dataset", data, "--val_split", "test",
                    "--workers", str(workers), "--out_dir", probe_dir],
                   os.path.join(table.out, f"e2e_probe_{name}.log"), 300, env)
        with open(os.path.join(probe_dir, "results.json")) as f:
            r = json.load(f)["results"][data]["all"]
        linear[name] = r["linear"]
        table.add(f"linear / k-NN top-1 on the test split, {title}",
                  f"{r['linear']:.2f} / {r['knn']:.2f} (probe {time.perf_counter() - t0:.0f} s)",
                  **{f"e2e_{name}_linear": r["linear"], f"e2e_{name}_knn": r["knn"]})
    gain = linear["lejepa"] - linear["random"]
    table.add("LeJEPA - random init, linear top-1", f"{gain:+.2f} points; item 5 took "
              f"{time.perf_counter() - start:.0f} s", e2e_gain_linear=gain)


# -----------------------------------------------------------------------------
# Main: each item in turn; a failure is a row of the table, and the next item runs

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "out/gpu_check", help="table, numbers and logs")
    p.add_argument("--cifar", default=None, help="CIFAR-10 JPEG folder or .tar.gz; on a GPU the default is "
                   ".gpu_data/cifar10-jpg.tar.gz, else ../shared/data/...; the CPU form has none")
    p.add_argument("--photos", default=None, help="folder of JPEG photos (default .gpu_data/photos, else "
                   "../shared/data/photos); '' or none there: synthetic images")
    p.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="items to run")
    p.add_argument("--budget_s", type=float, default=470.0, help="item 5's pretraining ends by then")
    p.add_argument("--compile_limit_s", type=float, default=240.0, help="longer compile warm-up: skipped")
    p.add_argument("--e2e_model", default=E2E["model"], help="timm backbone of item 5")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sz = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    if device.type != "cuda":
        torch.set_num_threads(1)  # tiny ops: on a busy 2-core CPU, threads waiting for each other cost 10x
    near = [os.path.join(ROOT, ".gpu_data"), os.path.join(ROOT, "..", "shared", "data")]
    if args.photos is None:
        args.photos = next((d for d in (os.path.join(n, "photos") for n in near) if os.path.isdir(d)), "")
    if args.cifar is None:  # the CPU form would take many minutes to probe the real CIFAR-10
        archives = [os.path.join(n, "cifar10-jpg.tar.gz") for n in near] if device.type == "cuda" else []
        args.cifar = next((f for f in archives if os.path.exists(f)), "")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(device=name, date=now.strftime("%Y-%m-%d %H:%M UTC"),
                torch=torch.__version__, timm=mvi.timm.__version__, cpus=os.cpu_count(),
                form="GPU" if device.type == "cuda" else "CPU", elapsed_s=0.0)
    table = Table(args.out, meta)
    print(f"gpu_check on {name}, {meta['date']}, torch {meta['torch']}, {meta['form']} form", flush=True)
    jpegs, source = load_jpegs(args.photos, 48)
    work = tempfile.mkdtemp(prefix="gpu_check-")

    def item(number, title, fn, *fn_args):
        if number not in args.sections:
            return
        table.item = number
        print(f"[{time.perf_counter() - table.begin:4.0f} s] {number}. {title}", flush=True)
        t0 = time.perf_counter()
        try:
            fn(table, *fn_args)
        except Exception as err:  # the table says so; the next item runs
            traceback.print_exc()
            table.add(title, f"failed: {type(err).__name__}: {str(err)[:400]}")
        torch._dynamo.reset()  # drop compiled graphs, which hold on to the model
        gc.collect()  # free this item's tensors (a failed one's too) before the next item needs the memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)

    item(1, "correctness on the device", check_correctness, device, sz, jpegs)
    item(2, "the official recipe's step on one GPU", check_step, device, sz, jpegs, args.compile_limit_s)
    item(3, "SIGReg: the direct form against the recurrence", check_sigreg_cost, device, sz)
    try:
        cifar = find_cifar(args.cifar, work) if {4, 5} & set(args.sections) else None
    except Exception as err:
        cifar, args.cifar = None, f"{args.cifar}, unreadable: {type(err).__name__}: {err}"
    files = sorted(glob.glob(os.path.join(cifar, "train", "*", "*.jpg")))[::25] if cifar else []
    item(4, "the data path", check_data_path, sz, jpegs, source, [open(f, "rb").read() for f in files])
    left = args.budget_s - (time.perf_counter() - table.begin) - sz.probe_reserve_s
    budget = min(sz.e2e_budget_s, left) if device.type == "cuda" else sz.e2e_budget_s
    if 5 in args.sections and NO_DATASETS:
        table.item = 5
        table.add("end to end on CIFAR-10", f"skipped: cannot import datasets ({NO_DATASETS[:300]})")
    elif 5 in args.sections and not cifar:
        table.item = 5
        table.add("end to end on CIFAR-10", f"skipped: no CIFAR-10 JPEGs (--cifar {args.cifar or 'none'})")
    elif 5 in args.sections and budget < sz.e2e_budget_s / 4:
        table.item = 5
        table.add("end to end on CIFAR-10", f"skipped: {left:.0f} s left of --budget_s {args.budget_s:.0f}")
    else:
        item(5, f"end to end on CIFAR-10, {budget:.0f} s of pretraining", check_end_to_end, device, sz,
             args.e2e_model, cifar, work, budget)
    shutil.rmtree(work, ignore_errors=True)
    print("\n" + table.write(), flush=True)
    print(f"wrote {os.path.join(args.out, 'gpu_check.md')} and gpu_check.json", flush=True)


if __name__ == "__main__":
    main()
