"""LeJEPA pretraining of any timm backbone on a Hugging Face image dataset (default: ViT-L/14 on ImageNet-1k).

LeJEPA (Balestriero & LeCun, arXiv 2511.08544): no teacher, no stop-gradient, no predictor. Every image
gives V views (2 global + 6 local); the loss pulls each view's projection towards the mean projection of
the global views (invariance) and pushes each view's projections towards an isotropic Gaussian (SIGReg):

    loss = (1 - lambda) * invariance + lambda * SIGReg,      lambda = 0.05

An online linear probe (LayerNorm + Linear on the detached backbone embedding) trains alongside and is
evaluated on the validation split after every epoch. Defaults are the paper's ViT-L / IN-1k / 100-epoch
recipe (seed README). Figures for this script (accuracy, time, memory) are NOT measured yet.

Commands (every Config field below is a flag: --field value):
    # one GPU (or CPU, single process)
    python minimal_vit_inet.py --model vit_small_patch16_224 --batch_size 256
    # one node, 8 GPUs: the seed recipe (global batch 512 = 64 per GPU)
    torchrun --nproc_per_node=8 minimal_vit_inet.py
    # two nodes through torchrun's rendezvous (run on every node)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=lejepa minimal_vit_inet.py
    # offline: a local folder of images by class (root/train/<class>/*.jpg, optional root/validation/...)
    python minimal_vit_inet.py --dataset /data/imagenette --model vit_small_patch16_224 --epochs 800
    # resume: run the same command with the same --out_dir; it continues where it stopped
ImageNet-1k (timm/imagenet-1k-wds) is gated: accept its terms on the hub and `hf auth login` first.
"""
import argparse
import dataclasses
import datetime
import fcntl
import functools
import importlib.util
import itertools
import json
import math
import multiprocessing as mp
import secrets
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
import timm
import datasets
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.ops import MLP
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from sigreg import SIGReg


# -----------------------------------------------------------------------------
# Config: every field is a command-line flag (--field value)

@dataclass
class Config:
    # data
    dataset: str = "timm/imagenet-1k-wds"  # hub id, local image folder (imagefolder) or save_to_disk folder
    dataset_config: str = ""  # hub config name ("" = default)
    dataset_revision: str = ""  # hub revision, e.g. refs/convert/parquet for script-only repos (frgfm/imagenette)
    dataset_data_dir: str = ""  # hub sub-folder, e.g. 160px for frgfm/imagenette
    train_split: str = "train"
    val_split: str = "validation"  # labelled split for the online probe ("" or missing = no evaluation)
    image_column: str = ""  # "" = auto (Image feature, else image/img/jpg)
    label_column: str = ""  # "" = auto (ClassLabel feature, else label/cls/fine_label); labels only feed the probe
    num_classes: int = 0  # 0 = auto (ClassLabel, else max label + 1; 1000 for imagenet-1k when streaming)
    streaming: bool = False  # stream hub data (no full download); shards split across ranks
    num_proc: int = 0  # processes that prepare a downloaded dataset (timm/imagenet-1k-wds: 155 GB); 0 = one
    shuffle_buffer: int = 10_000  # streaming: images in the shuffle buffers of one rank, split over its workers
    steps_per_epoch: int = 0  # 0 = dataset size // global batch (streaming needs the size in the hub metadata)
    workers: int = 10  # DataLoader workers per rank: JPEG decoding + augmentation happen there
    # views (seed README table; paper ablation: V = 2 global + 6 local is the sweet spot)
    n_global: int = 2  # global views; the invariance targets are their mean
    n_local: int = 6  # local views
    global_size: int = 224  # px
    local_size: int = 98  # px (14 divides both 224 and 98: one ViT-L/14 serves both)
    global_scale: tuple[float, float] = (0.3, 1.0)  # RandomResizedCrop area fraction
    local_scale: tuple[float, float] = (0.05, 0.3)
    # model
    model: str = "vit_large_patch14_224"  # any timm name (ViT, ConvNeXt, ResNet, ...), trained from scratch
    drop_path: float = 0.0  # stochastic depth; > 0 makes resume not bit-exact (its RNG is not checkpointed)
    proj_hidden: int = 2048  # projector MLP hidden width (BatchNorm + ReLU after each hidden layer)
    proj_dim: int = 128  # projector output = the space where invariance and SIGReg are measured
    compile: bool = False  # torch.compile the backbone
    # loss
    lamb: float = 0.05  # lambda: weight of SIGReg in (1 - lambda) * invariance + lambda * SIGReg
    num_slices: int = 1024  # SIGReg random directions per step (paper: 1024)
    # optimisation (seed README: AdamW, lr 5e-4, wd 5e-2 ViT / 5e-4 ResNet, warm-up + cosine to lr/1000)
    epochs: int = 100
    batch_size: int = 512  # GLOBAL images per step, split evenly over ranks (paper ablation: 512 is best)
    lr: float = 5e-4  # peak learning rate, not scaled with the batch
    weight_decay: float = -1.0  # < 0 = auto: 5e-2 for ViTs, 5e-4 for convnets
    warmup_epochs: float = 10.0  # linear warm-up (the paper does not state its length; DINO uses 10)
    final_lr_div: float = 1000.0  # cosine ends at lr / final_lr_div at the very last step
    probe_lr: float = 1e-3  # online probe (same schedule shape)
    probe_weight_decay: float = 1e-6
    bf16: bool = torch.cuda.is_available()  # bf16 autocast (no GradScaler: that is for fp16); CPU: fp32 unless asked
    seed: int = 0
    # logging and checkpoints
    out_dir: str = "out/lejepa"  # checkpoint, metrics.jsonl, exported backbone; resumes from here
    log_every: int = 10  # steps between metric lines (the only host syncs besides the guard below)
    save_every: int = 1000  # steps between checkpoints (also at every epoch end)
    stop_after: int = 0  # > 0: checkpoint and exit after this many steps, schedule unchanged (time-limited jobs)
    export: str = ""  # a ckpt.pt: write its export/ folder (timm's Hugging Face format) beside it and exit
    tensorboard: bool = False  # also log to TensorBoard, in out_dir/tensorboard (pip install tensorboard)
    wandb: str = ""  # also log to this Weights & Biases project; a resumed run continues its wandb run


def looks_local(dataset: str) -> bool:
    """A path (absolute, relative, home) or an existing folder, rather than a hub id (owner/name)."""
    return dataset.startswith(("/", ".", "~")) or os.path.isdir(dataset) or dataset.count("/") > 1


def parse_config(argv=None) -> Config:
    """argparse generated from the dataclass: --field value for every field; bools take true/false."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif "tuple" in str(f.type):
            p.add_argument(f"--{f.name}", type=float, nargs=2, default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()})
    # fail fast, before any heavy work, with one clear line
    positive = ["batch_size", "global_size", "local_size", "num_slices", "proj_hidden", "proj_dim", "epochs", "lr",
                "log_every", "save_every", "shuffle_buffer", "final_lr_div"]
    not_negative = ["workers", "num_proc", "num_classes", "steps_per_epoch", "stop_after", "warmup_epochs", "n_local", "drop_path"]
    checks = [(getattr(cfg, k) > 0, f"--{k} must be > 0, got {getattr(cfg, k)}") for k in positive]
    checks += [(getattr(cfg, k) >= 0, f"--{k} must be >= 0, got {getattr(cfg, k)}") for k in not_negative]
    checks += [
        (0.0 <= cfg.lamb <= 1.0, f"--lamb must be in [0, 1], got {cfg.lamb}"),
        (cfg.n_global >= 1, f"--n_global must be >= 1 (the invariance targets are the global views), got {cfg.n_global}"),
        (cfg.drop_path < 1, f"--drop_path must be < 1, got {cfg.drop_path}"),
        (all(0 < a <= b <= 1 for a, b in (cfg.global_scale, cfg.local_scale)),
         f"crop scales need 0 < min <= max <= 1, got {cfg.global_scale} and {cfg.local_scale}"),
        (cfg.warmup_epochs < cfg.epochs, f"--warmup_epochs {cfg.warmup_epochs} is not shorter than --epochs {cfg.epochs}: "
         f"the learning rate would never reach its peak; pass a shorter warm-up, e.g. --warmup_epochs {cfg.epochs / 10:g}"),
        (timm.is_model(cfg.model), f"unknown timm model {cfg.model!r}; see timm.list_models('*vit*')"),
        (not cfg.tensorboard or importlib.util.find_spec("tensorboard"), "--tensorboard needs: pip install tensorboard"),
        (not cfg.wandb or importlib.util.find_spec("wandb"), "--wandb needs: pip install wandb (and wandb login)"),
        (not looks_local(cfg.dataset) or os.path.isdir(cfg.dataset),
         f"--dataset {cfg.dataset}: no such folder (a local dataset is a folder; a hub id is owner/name)"),
    ]
    for ok, msg in checks:
        if not ok:
            sys.exit(f"error: {msg}")
    return cfg


# -----------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` runs one process

# Collectives wait this long for a slow rank (NCCL's default is 10 minutes): a rank 0 writing a 3.7 GB
# checkpoint to a network filesystem, or ranks of another node still preparing the dataset. A rank that
# fails does not make the others wait for it: it exits at once (run()), and torchrun then stops them all.
DIST_TIMEOUT = datetime.timedelta(minutes=60)


def setup_distributed():
    ddp = "RANK" in os.environ
    if ddp:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=DIST_TIMEOUT)
        exit_with_launcher()
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return ddp, rank, world, device


def run(main, *args):
    """Call main; on any error end this process at once, non-zero, with the traceback (or the one-line
    message of sys.exit). os._exit skips the interpreter's exit handlers, which would otherwise wait
    forever for DataLoader workers (they ignore SIGTERM, see below); the workers notice their parent is
    gone and exit too. Under torchrun the agent then stops the other ranks, so the whole job ends."""
    try:
        main(*args)
    except BaseException as err:  # KeyboardInterrupt and SystemExit too
        if isinstance(err, SystemExit):
            code = err.code if isinstance(err.code, int) else (err.code is not None)
            if isinstance(err.code, str):
                print(err.code, file=sys.stderr)
        else:
            code = 1
            rank = os.environ.get("RANK")
            print(f"error on rank {rank}:" if rank else "error:", file=sys.stderr)
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def exit_with_launcher(poll_s: float = 1.0):
    """Under torchrun: end this process soon after the torchrun process dies (the OOM killer, kill -9, a closed
    shell). Its workers live in sessions of their own and would otherwise train on, writing to out_dir."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:  # re-parented once the launcher is gone
            time.sleep(poll_s)
        print(f"error: rank {os.environ.get('RANK')}: torchrun (pid {launcher}) is gone; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


LOCK = {"fd": None}  # the open lock file of out_dir; the OS releases the lock when the process dies


def lock_out_dir(out_dir: str) -> int:
    """Take the exclusive lock of out_dir (flock on out_dir/lock, holding our pid). Returns 0, or the pid of the
    process that holds it. A lock file that exists is opened without being written, so a refused launch
    touches nothing; a crashed holder leaves no stale lock (flock dies with its process)."""
    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(os.path.join(out_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        return int(holder) if holder.isdigit() else -1
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    LOCK["fd"] = fd
    return 0


WORKER_GRACE_S = 60  # a DataLoader worker lives this long after a SIGTERM


def _worker_init(worker_id):
    """DataLoader workers: keep serving batches for WORKER_GRACE_S after a SIGTERM sent to the whole process group,
    so the main process reaches its checkpoint (then it stops them), but end then: a process exiting without
    stopping them (an interpreter exit handler, which sends SIGTERM and waits) must not wait forever. And drop the
    inherited lock file descriptor, so the lock is released when the main process dies."""
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(WORKER_GRACE_S))  # SIGALRM's default action ends it
    if LOCK["fd"] is not None:
        os.close(LOCK["fd"])  # closes this process's reference only: the lock stays with the main process


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


STOP = {"requested": False}  # set by SIGTERM (cluster preemption); the loop checkpoints and exits


def _on_sigterm(signum, frame):
    STOP["requested"] = True


# -----------------------------------------------------------------------------
# Data: load a split, find its columns, multi-crop views (uint8, in workers), loaders

IMAGE_NAMES, LABEL_NAMES = ("image", "img", "jpg", "png"), ("label", "cls", "fine_label", "labels")


def load_split(dataset: str, split: str, config: str = "", streaming: bool = False, missing_ok: bool = False,
               revision: str = "", data_dir: str = "", num_proc: int = 0):
    """One split of a hub dataset, a local image folder (imagefolder builder) or a save_to_disk folder.

    With missing_ok, returns None when the split does not exist (e.g. no validation folder)."""
    prepare = dict(num_proc=num_proc) if num_proc and not streaming else {}  # parallel preparation, if asked
    try:
        if os.path.isdir(dataset) and os.path.exists(os.path.join(dataset, "dataset_dict.json")):
            ds = datasets.load_from_disk(dataset)[split]  # a DatasetDict written by save_to_disk
        elif os.path.isdir(dataset) and os.path.exists(os.path.join(dataset, "dataset_info.json")):
            return datasets.load_from_disk(dataset) if split == "train" else None  # a single saved split
        elif os.path.isdir(dataset):
            ds = datasets.load_dataset("imagefolder", data_dir=dataset, split=split, streaming=streaming,
                                       **prepare)
        else:
            ds = datasets.load_dataset(dataset, config or None, split=split, streaming=streaming,
                                       revision=revision or None, data_dir=data_dir or None,
                                       **prepare)
    except (ValueError, KeyError) as err:  # an unknown split (KeyError: of a save_to_disk folder) or config
        if missing_ok and (isinstance(err, KeyError) or "split" in str(err)):
            return None
        sys.exit(f"error: {dataset}: {hub_error(dataset, config, split, err)}")
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as err:
        sys.exit(f"error: {dataset}: {hub_error(dataset, config, split, err)}")
    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset(num_shards=64)  # local data, streamed like the hub
    return ds


def hub_error(dataset: str, config: str, split: str, err: Exception) -> str:
    """One line saying what went wrong loading a dataset, and what to do (datasets' own messages, translated)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "gated" in text:
        return (f"gated on the hub: accept its terms at https://huggingface.co/datasets/{dataset} and log in "
                f"(hf auth login)")
    if isinstance(err, ConnectionError):
        return (f"cannot reach the Hugging Face hub ({text}); offline, use a local copy: --dataset FOLDER (images "
                f"in FOLDER/train/<class>/, or a save_to_disk folder), or HF_HUB_OFFLINE=1 with a cached copy")
    if "doesn't exist" in text or isinstance(err, FileNotFoundError):
        return f"no such dataset on the hub, or no access to it ({text}); check the id (owner/name)"
    if "BuilderConfig" in text:
        return f"no config {config!r} ({text}); pass --dataset_config with one of those"
    if "split" in text:
        return f"no split {split!r} ({text})"
    return text


def find_columns(ds, image_column: str = "", label_column: str = ""):
    """(image column, label column or None): Image / ClassLabel features first, then common names."""
    feats = ds.features or {}
    names = list(feats) or list(ds.column_names or [])
    image = image_column or next((k for k, v in feats.items() if isinstance(v, datasets.Image)), None) \
        or next((k for k in IMAGE_NAMES if k in names), None)
    label = label_column or next((k for k, v in feats.items() if isinstance(v, datasets.ClassLabel)), None) \
        or next((k for k in LABEL_NAMES if k in names), None)
    if image is None:
        raise ValueError(f"no image column found among {names}; pass --image_column")
    return image, label


def count_classes(ds, label_col, dataset_name: str = "") -> int:
    """Number of classes for the probe: ClassLabel, else max label + 1 (map-style) or 1000 for ImageNet-1k;
    0 when unknown (a stream without ClassLabel)."""
    feat = (ds.features or {}).get(label_col)
    if isinstance(feat, datasets.ClassLabel):
        return feat.num_classes
    if isinstance(ds, datasets.Dataset):
        return int(max(ds[label_col])) + 1
    return 1000 if "imagenet-1k" in dataset_name else 0


def _uniform(g, lo=0.0, hi=1.0) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


class MultiCrop:
    """DINO-style multi-crop with the seed README's augmentations, split between the worker and the device.

    mc(img, generator) -> [(pixels, colour)] * n_global (global views) + ... * n_local (local views), where
    pixels is the crop, resized and maybe flipped (PIL, in the DataLoader worker), uint8 (3, H, W), and
    colour is that view's colour draws, float (11,), applied on the device by colour_augment(), batched:
    colour jitter (p 0.8; 4 ops in random order, like torchvision), grayscale (0.2), Gaussian blur (0.5),
    solarize (0.2). Workers then only decode, crop, resize and flip: 7.8x the images/s per core of the plain
    torchvision v2 pipeline (bench/multicrop_bench.py, 2-core CPU; without a GPU, worker and colour stage
    together still make 2.4x).
    Every random draw uses `generator`, so a view depends only on the image and the generator's seed."""

    def __init__(self, global_size=224, local_size=98, n_global=2, n_local=6,
                 global_scale=(0.3, 1.0), local_scale=(0.05, 0.3)):
        self.global_size, self.local_size, self.n_global, self.n_local = global_size, local_size, n_global, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> list:
        img = img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image
        views = [(self.global_size, self.global_scale)] * self.n_global + [(self.local_size, self.local_scale)] * self.n_local
        draws = [self.params(*img.size, size, scale, generator) for size, scale in views]
        return [(self.view(img, p), p["colour"]) for p in draws]

    @staticmethod
    def crop_box(width, height, scale, g, ratio=(3 / 4, 4 / 3)):
        """RandomResizedCrop's box (left, top, right, bottom): torchvision's algorithm, 10 tries then centre."""
        area = width * height
        for _ in range(10):
            target = area * _uniform(g, *scale)
            aspect = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                return left, top, left + w, top + h
        w, h = width, height  # fallback: centre crop clamped to the allowed aspect ratios
        if width / height < ratio[0]:
            h = round(width / ratio[0])
        elif width / height > ratio[1]:
            w = round(height * ratio[1])
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def params(self, width, height, size, scale, g) -> dict:
        """One view's random draws, all from g: the crop box, then each op's coin and argument (seed README's
        probabilities and ranges). colour = [order of the 4 jitter ops (-1 x 4: no jitter), brightness,
        contrast, saturation, hue, grayscale 0|1, blur sigma (0: no blur), solarize 0|1]."""
        box = self.crop_box(width, height, scale, g)
        flip, jitter, gray, blur, solarize, b, c, s, h, sigma = torch.rand(10, generator=g).tolist()  # 1 call, not 10
        order = torch.randperm(4, generator=g).tolist() if jitter < 0.8 else [-1] * 4  # ColorJitter's random order
        factors = [0.6 + 0.8 * b, 0.6 + 0.8 * c, 0.8 + 0.4 * s, -0.1 + 0.2 * h]  # ColorJitter(0.4, 0.4, 0.2, 0.1)
        colour = order + factors + [gray < 0.2, 0.1 + 1.9 * sigma if blur < 0.5 else 0.0, solarize < 0.2]
        return {"size": size, "box": box, "flip": flip < 0.5, "colour": torch.tensor(colour, dtype=torch.float32)}

    @staticmethod
    def view(img, p) -> torch.Tensor:
        img = img.resize((p["size"], p["size"]), Image.BILINEAR, box=p["box"])  # crop + resize in one pass
        if p["flip"]:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return TF.pil_to_tensor(img)  # uint8 (3, size, size): a quarter of float32's bytes through queues and PCIe


# Colour stage, on the device, batched; each op follows torchvision's float-tensor kernel with a per-image argument
GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@functools.cache
def channel_constant(values: tuple, device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1) constant, built once per device: torch.tensor(..., device=cuda) in a step would be a
    blocking host-to-device copy, i.e. a host sync, every time."""
    return torch.tensor(values, device=device).view(1, 3, 1, 1)


def grayscale(x):  # (N, 3, H, W) -> (N, 1, H, W)
    return (x * channel_constant(GRAY, x.device)).sum(1, keepdim=True)


def blend(x, y, f):  # f * x + (1 - f) * y, clamped: brightness (y = 0), contrast (y = mean gray), saturation (y = gray)
    return (f * x + (1 - f) * y).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotate the HSV hue by shift (in turns), keeping saturation and value: per pixel, with max, min and
    delta = max - min of (r, g, b) and the hue h in sixths of a turn, channel n (r: 5, g: 3, b: 1) becomes
    max - delta * clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6 (the HSV -> RGB formula, S * V = delta)."""
    r, g, b = x.unbind(1)
    hi, lo = x.amax(1), x.amin(1)
    delta = hi - lo
    d = torch.where(delta > 0, delta, 1.0)  # grey pixels: any hue, delta = 0 leaves them grey
    h = torch.where(hi == r, (g - b) / d, torch.where(hi == g, (b - r) / d + 2, (r - g) / d + 4)) + 6 * shift.view(-1, 1, 1)
    return torch.stack([hi - delta * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
                        for k in ((n + h) % 6 for n in (5, 3, 1))], 1)


def gaussian_blur(x, sigma, size=23):
    """Per-image Gaussian blur (kernel 23, like the seed's torchvision GaussianBlur; reflect padding);
    sigma 0 gives a one-tap kernel, the image unchanged. x (N, C, H, W), sigma (N,)."""
    N, C, H, W = x.shape
    if N == 0:
        return x
    half = min(size // 2, H - 1, W - 1)
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N * C, taps): one kernel per image, all channels
    x = F.pad(x.reshape(1, N * C, H, W), (half,) * 4, mode="reflect")
    x = F.conv2d(x, k[:, None, None, :], groups=N * C)  # separable: rows, then columns
    return F.conv2d(x, k[:, None, :, None], groups=N * C).view(N, C, H, W)


def colour_plan(colour: torch.Tensor):
    """Which images each colour op applies to, from the draws (N, 11), on the CPU (in a DataLoader worker):
    (indices, sizes), the indices of 18 groups concatenated: jitter slot 0..3 x op 0..3, grayscale, blur.
    Sent with the batch, it spares the training device the 18 nonzero() calls (host syncs) per view."""
    groups = [colour[:, slot] == k for slot in range(4) for k in range(4)] + [colour[:, 8] > 0, colour[:, 9] > 0]
    indices = [g.nonzero().squeeze(1) for g in groups]
    return torch.cat(indices), [len(i) for i in indices]


def colour_augment(x: torch.Tensor, colour: torch.Tensor, plan=None) -> torch.Tensor:
    """uint8 views (N, 3, H, W), their colour draws (N, 11) from MultiCrop and their colour_plan() -> float,
    augmented, normalised. Each op runs on the images whose draw asks for it (indexing, not torch.where over
    the whole batch: on the CPU that computed every jitter op 4 times and made the stage 3.7x slower). With the
    plan on the device (and sizes on the host) nothing here waits for the device."""
    indices, sizes = plan if plan is not None else colour_plan(colour.cpu())
    groups = indices.to(x.device, non_blocking=True).split(sizes)  # split by host ints: no sync
    x = x.float() / 255
    c = colour.view(-1, 11, 1, 1)  # each column broadcasts over (n, 1, H, W)
    ops = [lambda x, f: blend(x, 0.0, f), lambda x, f: blend(x, grayscale(x).mean((2, 3), keepdim=True), f),
           lambda x, f: blend(x, grayscale(x), f), adjust_hue]  # brightness, contrast, saturation, hue
    for slot in range(4):  # jitter: each image's 4 ops in its own random order (-1: jitter off)
        for k, op in enumerate(ops):
            i = groups[4 * slot + k]  # images whose op in this slot is k
            x[i] = op(x[i], c[i, 4 + k:5 + k])
    gray, blur = groups[16], groups[17]
    x[gray] = grayscale(x[gray]).expand(-1, 3, -1, -1)
    x[blur] = gaussian_blur(x[blur], colour[blur, 9])
    x = torch.where((c[:, 10:11] > 0) & (x >= 128 / 255), 1 - x, x)  # solarize, threshold 128 of 255
    return normalize(x, scale=1.0)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalize(x: torch.Tensor, scale: float = 255.0) -> torch.Tensor:
    """uint8 (B, 3, H, W) (or float in [0, 1] with scale=1) -> float normalised with the ImageNet mean/std."""
    mean, std = channel_constant(IMAGENET_MEAN, x.device), channel_constant(IMAGENET_STD, x.device)
    return (x.float() / scale - mean) / std


def eval_transform(img: Image.Image, generator=None, size: int = 224) -> torch.Tensor:
    """Resize the short side to size / 0.875, centre-crop size: the usual ImageNet evaluation view, uint8.
    (Same call signature as MultiCrop; the generator is unused: nothing is random.)"""
    img = TF.resize(img.convert("RGB"), int(size / 0.875), interpolation=TF.InterpolationMode.BICUBIC)
    return TF.pil_to_tensor(TF.center_crop(img, [size, size]))


def seed_rank(seed: int, rank: int):
    """Seed the global RNG by (seed, rank): what each rank draws on its own (stochastic depth, streamed views)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample: the same for any worker count, world size or resume point."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


# what PIL raises for truncated, corrupt or unsupported files (DecompressionBombError: absurdly large images)
BAD_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def skip_bad_image(counter, index, err):
    """Count (in a counter shared by all DataLoader workers) and report an image that cannot be used."""
    with counter.get_lock():
        counter.value += 1
    print(f"warning: skipped unreadable image #{index}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


class ViewsDataset(torch.utils.data.Dataset):
    """Map-style: item (epoch, index) -> (views, label). The sampler passes the epoch with the index.
    A file that cannot be decoded is replaced by the next readable one (so batches stay full and every rank
    does the same steps) and counted in `skipped`: web-scraped sets hold broken files, a run must not die."""

    def __init__(self, ds, image_col, label_col, multicrop, seed):
        self.ds, self.image_col, self.label_col, self.mc, self.seed = ds, image_col, label_col, multicrop, seed
        self.skipped = mp.Value("i", 0)  # shared with the DataLoader's worker processes

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, i = key
        for j in range(i, i + 100):
            j %= len(self.ds)
            try:
                row = self.ds[j]  # decodes the image (PIL) here, in a worker
                g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, j))
                return self.mc(row[self.image_col], g), (row[self.label_col] if self.label_col else -1)
            except BAD_IMAGE as err:
                skip_bad_image(self.skipped, j, err)
        raise RuntimeError(f"100 unreadable images in a row from #{i}: is --image_column {self.image_col!r} right?")


class StreamViews(torch.utils.data.IterableDataset):
    """Streaming: (views, label) from a datasets.IterableDataset, which splits its shards over workers itself.
    Augmentations use each worker's own RNG (seeded by the DataLoader), so a streamed resume is not exact."""

    def __init__(self, ds, image_col, label_col, transform):
        self.ds, self.image_col, self.label_col, self.transform = ds, image_col, label_col, transform
        self.skipped = mp.Value("i", 0)  # unreadable images, shared with the DataLoader's worker processes

    def __iter__(self):
        ds = self.ds  # images are decoded below, to catch broken files (IterableDataset.decode: datasets >= 3.4)
        if isinstance((ds.features or {}).get(self.image_col), datasets.Image):
            ds = ds.cast_column(self.image_col, datasets.Image(decode=False))
            ds.set_epoch(self.ds.epoch)  # the cast copy starts at epoch 0
        for n, row in enumerate(ds):
            try:
                image = datasets.Image().decode_example(row[self.image_col]) \
                    if isinstance(row[self.image_col], dict) else row[self.image_col]
                views = self.transform(image, torch.default_generator)
            except BAD_IMAGE as err:
                skip_bad_image(self.skipped, n, err)
                continue
            yield views, (row[self.label_col] if self.label_col else -1)


def collate_views(items, num_classes: int = 0):
    """In the DataLoader worker: [(views, label)] * N -> ([(pixels (N, 3, H, W), colour (N, 11), colour_plan)] * V,
    labels (N,)). Labels beyond the probe's classes are refused here (streams show their labels only now)."""
    views, labels = zip(*items)
    if num_classes and max(labels) >= num_classes:
        raise ValueError(f"label {max(labels)} is beyond --num_classes {num_classes}")
    batch = []
    for view in zip(*views):  # the n-th view of every image
        pixels, colour = torch.stack([p for p, _ in view]), torch.stack([c for _, c in view])
        batch.append((pixels, colour, colour_plan(colour)))
    return batch, torch.tensor(labels)


def train_batches(cfg, ds, views, epoch, skip, rank, world, per_rank, steps_per_epoch, num_classes=0):
    """Map-style: the (views, labels) batches of one epoch on this rank, after skipping `skip` (resume mid-epoch).
    Streaming: every batch from `epoch` on, passes over the stream back to back (epoch ends do not restart it,
    so the shuffle buffers are filled once per pass, not once per epoch)."""
    collate = functools.partial(collate_views, num_classes=num_classes)
    if isinstance(ds, datasets.Dataset):  # map-style: DistributedSampler order, skip without decoding
        sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)  # a new permutation each epoch, the same on all ranks
        order = list(sampler)[skip * per_rank: steps_per_epoch * per_rank]
        loader = DataLoader(views, per_rank, sampler=[(epoch, i) for i in order], num_workers=cfg.workers,
                            drop_last=True, pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                            collate_fn=collate)
        yield from loader
        return
    for stream_pass in itertools.count(epoch):  # a rank whose shards run dry starts the next pass at once
        ds.set_epoch(stream_pass)  # reshuffles shards and buffers, the same on all ranks
        got = 0
        for batch in DataLoader(views, per_rank, num_workers=cfg.workers, drop_last=True, collate_fn=collate,
                                pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init):
            got += 1
            if got > skip:  # skipped batches are decoded (streams cannot seek)
                yield batch
        if got == 0:
            raise RuntimeError(f"rank {rank}: the stream gave no full batch of {per_rank} images")
        skip = max(0, skip - got)


def eval_loader(cfg, ds, image_col, label_col, rank, world, per_rank):
    """Validation batches (uint8 centre crops, labels); each rank gets a disjoint share, none repeated."""
    transform = functools.partial(eval_transform, size=cfg.global_size)
    if isinstance(ds, datasets.Dataset):
        data = ViewsDataset(ds, image_col, label_col, transform, cfg.seed)
        sampler = [(0, i) for i in range(rank, len(ds), world)]
        return DataLoader(data, per_rank, sampler=sampler, num_workers=cfg.workers, worker_init_fn=_worker_init,
                          pin_memory=torch.cuda.is_available())
    ds = split_dataset_by_node(ds, rank, world)
    return DataLoader(StreamViews(ds, image_col, label_col, transform), per_rank, num_workers=cfg.workers,
                      worker_init_fn=_worker_init, pin_memory=torch.cuda.is_available())


# -----------------------------------------------------------------------------
# Model: timm backbone -> embedding (probe reads it) -> BatchNorm MLP projector (the loss reads it)

def build_backbone(name: str, img_size: int = 224, drop_path: float = 0.0) -> nn.Module:
    """A timm model from scratch with no classifier: model(x) is the (B, D) embedding (CLS token / pooled).
    ViTs get dynamic_img_size so one model serves global and local views; convnets take any size anyway."""
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path)
    try:
        return timm.create_model(name, img_size=img_size, dynamic_img_size=True, **kwargs)
    except TypeError:  # not a ViT-like model: no img_size / dynamic_img_size arguments
        return timm.create_model(name, **kwargs)


def default_weight_decay(backbone: nn.Module) -> float:
    """Seed README: 5e-2 for Vision Transformers, 5e-4 for ResNets. Models with a patch embedding (ViT, DeiT,
    EVA, Swin) count as transformers; convnets (ConvNeXt included: the README does not say) get 5e-4."""
    return 5e-2 if hasattr(backbone, "patch_embed") else 5e-4


class LeJEPA(nn.Module):
    """Backbone + projector (+ probe on the detached embedding). One module so DDP syncs all gradients."""

    def __init__(self, backbone, proj_hidden, proj_dim, num_classes=0):
        super().__init__()
        D = backbone.num_features
        self.backbone = backbone
        # BatchNorm keeps the start away from the all-zero point, where SIGReg's gradient vanishes
        self.projector = MLP(D, [proj_hidden, proj_hidden, proj_dim], norm_layer=nn.BatchNorm1d)
        self.probe = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, num_classes)) if num_classes else None

    def forward(self, views: list, n_global: int):
        """views: V tensors (N, 3, H, W), globals first -> emb (V, N, D), proj (V, N, P), logits (G, N, C) | None
        for the G global views: the probe is evaluated on full-size centre crops, so it learns from the global
        views alone (trained on every view, 16 px local crops included, it lagged the frozen-feature probe)."""
        N = views[0].shape[0]
        groups = [views[:n_global], views[n_global:]]  # one backbone forward per resolution
        emb = torch.cat([self.backbone(torch.cat(g)) for g in groups if g])  # (V * N, D)
        proj = self.projector(emb).view(len(views), N, -1)  # (V, N, P)
        G = n_global * N
        logits = self.probe(emb[:G].detach()).view(n_global, N, -1) if self.probe is not None else None
        return emb.view(len(views), N, -1), proj, logits


# -----------------------------------------------------------------------------
# Loss: invariance to the global views' mean + SIGReg on every view

def lejepa_loss(proj: torch.Tensor, n_global: int, sigreg: nn.Module, lamb: float):
    """proj: (V, N, P), globals first. Returns (loss, invariance, sigreg) as scalars.

    invariance = mean over views v, images n and dims of (z_vn - c_n)^2, c_n = mean of the global views' z_n
    (every view, globals included, is pulled to the centre); SIGReg is computed per view then averaged."""
    proj = proj.float()  # under bf16 autocast the projector's output is bf16: the loss is taken in fp32
    centers = proj[:n_global].mean(0)  # (N, P)
    invariance = (proj - centers).square().mean()
    sig = sigreg(proj)  # fp32 inside; all-reduced over ranks inside, so every rank must call it
    return (1 - lamb) * invariance + lamb * sig, invariance, sig


# -----------------------------------------------------------------------------
# Optimiser and schedule: AdamW, linear warm-up, cosine down to lr / final_lr_div

def lr_at(step: int, total: int, warmup: int, lr: float, final_div: float = 1000.0) -> float:
    """Learning rate of optimiser step `step` in [0, total): warm-up ends at lr, step total-1 is lr/final_div."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)  # 0 -> 1 over the remaining steps
    final = lr / final_div
    return final + (lr - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: LeJEPA, weight_decay: float, probe_wd: float):
    """No weight decay on biases and norm weights (1-D); the probe has its own lr and decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not name.startswith("probe."):
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, name="net"),
              dict(params=no_decay, weight_decay=0.0, name="net")]
    if model.probe is not None:
        groups.append(dict(params=list(model.probe.parameters()), weight_decay=probe_wd, name="probe"))
    return groups


# -----------------------------------------------------------------------------
# Checkpoint: a plain dict written atomically by rank 0; resume is the same code path

def checkpoint_state(model: LeJEPA, optimizer, sigreg, step: int, cfg: Config) -> dict:
    return dict(backbone=model.backbone.state_dict(), projector=model.projector.state_dict(),
                probe=model.probe.state_dict() if model.probe is not None else None,
                optimizer=optimizer.state_dict(), sigreg=sigreg.state_dict(), step=step,
                config=dataclasses.asdict(cfg))


def write_atomic(obj, path: str):
    tmp = path + ".tmp"  # same directory: os.replace is atomic, a crash never leaves half a file
    with open(tmp, "wb") as f:  # opened here: the OS's own error text on every torch version
        torch.save(obj, f)
    os.replace(tmp, path)


def save_checkpoint(path: str, model: LeJEPA, optimizer, sigreg, step: int, cfg: Config):
    write_atomic(checkpoint_state(model, optimizer, sigreg, step, cfg), path)


class Checkpointer:
    """Rank 0's checkpoints, written off the training path: save() copies the state to CPU memory (the only
    pause of the loop) and a thread writes the copy to disk (torch.save releases the GIL: the loop runs on at
    0.98x meanwhile). ViT-L + AdamW (3.7 GB) on the 2-core CPU: a synchronous save pauses the loop 3.4 s, the
    copy 1.4 s (bench/checkpoint_bench.py). A failed write is raised in the loop at the next log step or save."""

    def __init__(self, path: str, step: int, writer: bool):
        self.path, self.step, self.writer = path, step, writer  # step: of the last checkpoint, 0 = none
        self.thread, self.error, self.buffers = None, None, []

    def snapshot(self, state: dict) -> dict:
        """state with every tensor copied into CPU buffers kept from one save to the next (pinned on GPU): a fresh
        allocation would cost more than the copy itself (first-touch page faults: 2.2x slower here)."""
        leaves, spec = pytree.tree_flatten(state)
        tensors = [t for t in leaves if torch.is_tensor(t)]
        if [(b.shape, b.stride()) for b in self.buffers] != [(t.shape, t.stride()) for t in tensors]:
            # the same strides (channels_last weights): fused AdamW reads its state in the parameter's layout
            self.buffers = [torch.empty_like(t, device="cpu", pin_memory=t.is_cuda) for t in tensors]
        for b, t in zip(self.buffers, tensors):
            b.copy_(t.detach(), non_blocking=True)
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()  # the copies are complete before the writer reads them
        copies = iter(self.buffers)
        return pytree.tree_unflatten([next(copies) if torch.is_tensor(x) else x for x in leaves], spec)

    def save(self, model, optimizer, sigreg, step: int, cfg: Config):
        self.wait()  # one write at a time
        self.step = step
        if not self.writer:  # every rank calls save(); rank 0 writes
            return
        state = self.snapshot(checkpoint_state(model, optimizer, sigreg, step, cfg))
        self.thread = threading.Thread(target=self._write, args=(state,), name="checkpoint-writer")
        self.thread.start()

    def _write(self, state):
        try:
            write_atomic(state, self.path)
        except BaseException as err:  # raised in the training loop by check() or wait()
            self.error = err

    def check(self):
        if self.error is not None:
            raise RuntimeError(f"writing {self.path} failed") from self.error

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.check()


# settings a resumed run may change; any other difference means out_dir holds another run's checkpoint
RESUMABLE = {"workers", "log_every", "save_every", "stop_after", "compile", "out_dir", "bf16", "export",
             "tensorboard", "wandb", "num_proc"}


def check_same_run(path: str, cfg: Config) -> int:
    """The step of the checkpoint at `path`; exit with one line, touching nothing, if another run wrote it."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # mmap: no full read
        saved = ckpt["config"]
    except Exception as err:
        sys.exit(f"error: cannot read {path} ({type(err).__name__}: {err}); move it away to start afresh")
    diff = [f"--{k} {saved.get(k)!r} there, {v!r} here" for k, v in dataclasses.asdict(cfg).items()
            if k not in RESUMABLE and saved.get(k) != v]
    if diff:
        sys.exit(f"error: {path} belongs to another run ({'; '.join(diff)}); use another --out_dir, "
                 f"or the same settings to resume it")
    return ckpt["step"]


def load_checkpoint(path: str, model: LeJEPA, optimizer, sigreg) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file (holds the config dict)
    model.backbone.load_state_dict(ckpt["backbone"])
    model.projector.load_state_dict(ckpt["projector"])
    if model.probe is not None and ckpt["probe"] is not None:
        model.probe.load_state_dict(ckpt["probe"])
    optimizer.load_state_dict(ckpt["optimizer"])
    sigreg.load_state_dict(ckpt["sigreg"])  # slice counter: the next step draws the slices it would have
    return ckpt["step"]


def params_in_sync(model: nn.Module) -> bool:
    """True when every rank holds bit-identical parameters: per-tensor sums and sums of squares, gathered."""
    check = torch.stack([s for p in model.parameters() for s in (p.double().sum(), p.double().square().sum())])
    if not dist.is_initialized():
        return True
    gathered = [torch.empty_like(check) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, check)
    return all(torch.equal(gathered[0], g) for g in gathered)


# -----------------------------------------------------------------------------
# Training

def build_training(cfg: Config, num_classes: int, device: torch.device):
    """-> (LeJEPA model, SIGReg, AdamW, peak lr of each parameter group). Seed first: equal weights on every rank."""
    backbone = build_backbone(cfg.model, cfg.global_size, cfg.drop_path)
    # channels_last: convnets' convolutions run 1.3x faster on CPU (resnet18, 32 px; PyTorch recommends it on GPU
    # too); a ViT only has its patch embedding to convert
    model = LeJEPA(backbone, cfg.proj_hidden, cfg.proj_dim, num_classes).to(device, memory_format=torch.channels_last)
    sigreg = SIGReg(num_slices=cfg.num_slices, seed=cfg.seed).to(device)
    weight_decay = cfg.weight_decay if cfg.weight_decay >= 0 else default_weight_decay(backbone)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay, cfg.probe_weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.999), fused=True)  # fused: one kernel, and no host sync (CPU too)
    base_lrs = [cfg.probe_lr if g["name"] == "probe" else cfg.lr for g in optimizer.param_groups]
    return model, sigreg, optimizer, base_lrs


def train_step(model, optimizer, sigreg, batch, lrs, cfg, autocast, device) -> torch.Tensor:
    """One LeJEPA step: views -> embeddings -> loss -> AdamW. No host sync: the colour plan comes with the batch,
    the copies are non-blocking (pinned memory on GPU), nothing is read back. Returns the loss terms
    (loss, invariance, sigreg, probe_loss), on the device."""
    views, labels = batch
    xs = [colour_augment(x.to(device, non_blocking=True), c.to(device, non_blocking=True), plan)
          .contiguous(memory_format=torch.channels_last) for x, c, plan in views]  # V x (N, 3, H, W) float
    labels = labels.to(device, non_blocking=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    with autocast:
        emb, proj, logits = model(xs, cfg.n_global)  # (V, N, D), (V, N, P), (G, N, C)
        loss, inv, sig = lejepa_loss(proj, cfg.n_global, sigreg, cfg.lamb)
        # the probe learns from the global views; its input is detached, so it never shapes the backbone
        probe_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(cfg.n_global)) if logits is not None \
            else torch.zeros((), device=device)
    optimizer.zero_grad(set_to_none=True)
    (loss + probe_loss).backward()
    optimizer.step()
    return torch.stack([loss, inv, sig, probe_loss]).detach()


class Guard:
    """Stops every rank alike on a non-finite loss or a SIGTERM. update() records the first non-finite step and its
    loss terms on the device (no sync); check() reads them back, all-reduced over ranks: one host sync, made at
    the log interval and before every checkpoint, so no checkpoint ever holds weights a non-finite loss touched."""

    def __init__(self, device, checkpointer: Checkpointer):
        self.first_bad = torch.zeros(5, device=device)  # (step, loss, invariance, sigreg, probe_loss); step 0: none
        self.checkpointer = checkpointer

    def update(self, step: int, terms: torch.Tensor):
        new = ~torch.isfinite(terms).all() & (self.first_bad[0] == 0)
        self.first_bad = torch.where(new, torch.cat([terms.new_full((1,), step), terms.float()]), self.first_bad)

    def check(self, ddp: bool, step: int) -> bool:
        """True when a SIGTERM reached any rank; exits with one line when any rank saw a non-finite loss."""
        flags = torch.stack([self.first_bad[0], self.first_bad.new_full((), float(STOP["requested"]))])
        if ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_step, stop = flags.tolist()
        if bad_step:
            at, loss, inv, sig, probe = self.first_bad.tolist()
            where = f"at step {int(at)}: loss {loss} invariance {inv} sigreg {sig} probe {probe}" if at else \
                f"on another rank at step {int(bad_step)}"
            ckpt = self.checkpointer
            ckpt.wait()  # a checkpoint being written is complete before the process ends
            last = f"the last good checkpoint is {ckpt.path} (step {ckpt.step})" if ckpt.step else "no checkpoint yet"
            sys.exit(f"error: non-finite loss {where}; stopped at step {step}, {last}")
        return bool(stop)


def evaluate_probe(cfg, model, loader, device, autocast) -> float:
    """Top-1 accuracy of the online probe on the validation split (all ranks' shares summed)."""
    model.eval()
    counts = torch.zeros(2, device=device)  # correct, total
    with torch.no_grad(), autocast:
        for x, y in loader:
            x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            counts[0] += (model.probe(model.backbone(x)).argmax(-1) == y).sum()
            counts[1] += len(y)  # no host sync until the end
    if dist.is_initialized():
        dist.all_reduce(counts)
    model.train()
    return (counts[0] / counts[1].clamp(min=1)).item()


class Logger:
    """Rank 0's metrics: metrics.jsonl, the source of truth (on resume, lines after the checkpoint are dropped),
    mirrored to TensorBoard (--tensorboard true) and Weights & Biases (--wandb PROJECT) when asked."""

    def __init__(self, cfg: Config, start_step: int):
        path = os.path.join(cfg.out_dir, "metrics.jsonl")
        if os.path.exists(path):  # resume: drop what a killed run logged after its checkpoint
            with open(path) as f:
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= start_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        self.file, self.tensorboard, self.wandb = open(path, "a"), None, None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=start_step + 1)
        if cfg.wandb:
            import wandb
            id_path = os.path.join(cfg.out_dir, "wandb_id")  # the same wandb run across resumes
            run_id = open(id_path).read().strip() if os.path.exists(id_path) else secrets.token_hex(4)
            with open(id_path, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(project=cfg.wandb, id=run_id, resume="allow", dir=cfg.out_dir,
                                    name=os.path.basename(os.path.abspath(cfg.out_dir)), config=dataclasses.asdict(cfg))

    def __call__(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        if self.tensorboard:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(scalars, step=record["step"])

    def close(self):
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def export_for_hub(backbone: nn.Module, cfg: dict, step: int, folder: str, probe_acc=None):
    """Write `folder` in timm's Hugging Face format with timm's own helper: config.json (architecture, model args,
    and the pretrained config: input size, bicubic resize + 0.875 centre crop and the mean/std of training) and
    model.safetensors, plus a model card. timm.create_model("local-dir:FOLDER", pretrained=True) loads it;
    `hf upload USER/REPO FOLDER` publishes it for timm.create_model("hf-hub:USER/REPO", pretrained=True)."""
    size = cfg["global_size"]
    backbone.pretrained_cfg = dict(backbone.pretrained_cfg, tag="lejepa", input_size=(3, size, size), num_classes=0,
                                   interpolation="bicubic", crop_pct=0.875, crop_mode="center",
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD)  # as eval_transform and normalize
    args = dict(num_classes=0)
    if getattr(backbone, "dynamic_img_size", False):  # ViTs: one model for every view size
        args.update(img_size=size, dynamic_img_size=True)
    os.makedirs(folder, exist_ok=True)
    backbone.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
    timm.models.save_for_hf(backbone, folder, model_args=args, safe_serialization=True)
    acc = f"{100 * probe_acc:.2f}% (online linear probe, {cfg['val_split']} split)" if probe_acc is not None else \
        "not measured (run linear_probe.py)"
    card = [f"# LeJEPA {cfg['model']}", "",
            "Self-supervised backbone pretrained with LeJEPA (Balestriero & LeCun, arXiv 2511.08544): invariance",
            "+ SIGReg, no teacher, no stop-gradient. Weights only: no classifier head (num_classes=0).", "",
            f"- data: {cfg['dataset']} ({cfg['train_split']} split)",
            f"- recipe: {step} steps, {cfg['epochs']} epochs, global batch {cfg['batch_size']}, lr {cfg['lr']}, "
            f"lambda {cfg['lamb']}, {cfg['n_global']} x {cfg['global_size']} px + {cfg['n_local']} x {cfg['local_size']} px "
            f"views, {cfg['num_slices']} slices, projector {cfg['proj_hidden']}-{cfg['proj_dim']}",
            f"- top-1: {acc}", "",
            "```python", "import timm",
            f'model = timm.create_model("local-dir:{folder}", pretrained=True)  # or "hf-hub:USER/REPO"',
            "cfg = timm.data.resolve_data_config({}, model=model)  # the resize, crop and normalisation of training",
            "```", ""]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(card))
    print0(f"exported {folder}: timm.create_model('local-dir:{folder}', pretrained=True); publish with "
           f"`hf upload USER/REPO {folder}`")


def export_checkpoint(path: str):
    """--export: the export folder of any ckpt.pt, written beside it."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file (holds the config dict)
    backbone = build_backbone(ckpt["config"]["model"], ckpt["config"]["global_size"])
    backbone.load_state_dict(ckpt["backbone"])
    export_for_hub(backbone, ckpt["config"], ckpt["step"], os.path.join(os.path.dirname(path), "export"))


def main(cfg: Config):
    if cfg.export:
        return export_checkpoint(cfg.export)
    ddp, rank, world, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if cfg.batch_size % world:
        sys.exit(f"error: --batch_size {cfg.batch_size} is not divisible by the world size {world}")
    per_rank = cfg.batch_size // world
    signal.signal(signal.SIGTERM, _on_sigterm)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    saved_step = check_same_run(ckpt_path, cfg) if os.path.exists(ckpt_path) else 0  # never resume another run
    # one run per out_dir: rank 0 holds its lock until it exits; every rank learns the holder's pid
    holder = [lock_out_dir(cfg.out_dir) if master else 0]
    if ddp:
        dist.broadcast_object_list(holder, src=0)
    if holder[0]:
        sys.exit(f"error: {cfg.out_dir} is in use by another run (pid {holder[0]} holds {cfg.out_dir}/lock); "
                 f"wait for it to end, stop it, or pass another --out_dir")
    if cfg.stop_after and saved_step >= cfg.stop_after:
        print0(f"nothing to do: {ckpt_path} is at step {saved_step}, --stop_after {cfg.stop_after}")
        return
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    # data: every rank loads; datasets' file locks let one process per node download and prepare the cache
    # while the others wait (a barrier here would time out during a multi-hour ImageNet download)
    hub = dict(config=cfg.dataset_config, streaming=cfg.streaming, revision=cfg.dataset_revision,
               data_dir=cfg.dataset_data_dir, num_proc=cfg.num_proc)
    train_ds = load_split(cfg.dataset, cfg.train_split, **hub)
    val_ds = load_split(cfg.dataset, cfg.val_split, missing_ok=True, **hub) if cfg.val_split else None
    try:
        image_col, label_col = find_columns(train_ds, cfg.image_column, cfg.label_column)
    except ValueError as err:
        sys.exit(f"error: {cfg.dataset}: {err}")
    found = count_classes(train_ds, label_col, cfg.dataset) if label_col else 0
    if cfg.num_classes and found > cfg.num_classes:
        sys.exit(f"error: --num_classes {cfg.num_classes} is too few: the labels of {cfg.dataset} ({label_col!r}) "
                 f"go up to {found - 1}; pass --num_classes {found} or leave it at 0 (auto)")
    num_classes = cfg.num_classes or found
    if label_col and not num_classes:
        sys.exit(f"error: cannot count the classes of the streamed {cfg.dataset} (no ClassLabel); pass --num_classes")
    if cfg.streaming:
        # each DataLoader worker holds a buffer of its own (undecoded images, ~110 kB each for ImageNet): split
        # the rank's --shuffle_buffer over them, so that a node holds 8 x 10,000 images (~9 GB), not 8 x 10 x 10,000
        buffer = max(1, cfg.shuffle_buffer // max(1, cfg.workers))
        train_ds = split_dataset_by_node(train_ds.shuffle(cfg.seed, buffer_size=buffer), rank, world)
        n_train = (train_ds.info.splits or {}).get(cfg.train_split)
        n_train = n_train.num_examples if n_train else 0
    else:
        n_train = len(train_ds)
    steps_per_epoch = cfg.steps_per_epoch or n_train // cfg.batch_size
    if steps_per_epoch <= 0:
        sys.exit(f"error: cannot derive steps per epoch ({n_train} images, batch {cfg.batch_size}); pass --steps_per_epoch")
    if not cfg.streaming and steps_per_epoch > n_train // cfg.batch_size:  # an epoch is one pass, no repeats
        sys.exit(f"error: --steps_per_epoch {steps_per_epoch} x --batch_size {cfg.batch_size} exceeds the "
                 f"{n_train} images of {cfg.dataset}; at most {n_train // cfg.batch_size} (use --epochs for more)")
    total_steps, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    multicrop = MultiCrop(cfg.global_size, cfg.local_size, cfg.n_global, cfg.n_local, cfg.global_scale, cfg.local_scale)
    views = ViewsDataset(train_ds, image_col, label_col, multicrop, cfg.seed) if not cfg.streaming else \
        StreamViews(train_ds, image_col, label_col, multicrop)
    has_val = val_ds is not None and num_classes > 0 and label_col in (val_ds.features or {})

    # model, loss, optimiser
    model, sigreg, optimizer, base_lrs = build_training(cfg, num_classes, device)
    # from here on each rank draws its own randomness (stochastic depth, streamed augmentations); the
    # weights above are the same on every rank, and SIGReg's slices have their own shared generator
    seed_rank(cfg.seed, rank)

    os.makedirs(cfg.out_dir, exist_ok=True)
    start_step = load_checkpoint(ckpt_path, model, optimizer, sigreg) if os.path.exists(ckpt_path) else 0
    if cfg.compile:
        model.backbone.compile()  # in place: state_dict keys stay those of the plain timm model
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model

    V = cfg.n_global + cfg.n_local
    print0(f"torch {torch.__version__} | timm {timm.__version__} | datasets {datasets.__version__} | "
           f"{world} process(es) on {device.type} | {'bf16' if cfg.bf16 else 'fp32'}")
    print0("config: " + json.dumps(dataclasses.asdict(cfg)))
    print0(f"derived: global batch {cfg.batch_size} ({per_rank}/rank) | views/step {V * cfg.batch_size} "
           f"({cfg.n_global}x{cfg.global_size}px + {cfg.n_local}x{cfg.local_size}px per image) | "
           f"steps/epoch {steps_per_epoch} | total steps {total_steps} | warm-up {warmup} | "
           f"wd {optimizer.param_groups[0]['weight_decay']} | backbone "
           f"{sum(p.numel() for p in model.backbone.parameters()) / 1e6:.1f}M params, D={model.backbone.num_features} | "
           f"probe classes {num_classes} | val {'yes' if has_val else 'no'} | start step {start_step}")
    if master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    log = Logger(cfg, start_step) if master else lambda record: None

    val_loader = eval_loader(cfg, val_ds, image_col, label_col, rank, world, per_rank) if has_val else None
    checkpointer = Checkpointer(ckpt_path, start_step, writer=master)
    guard = Guard(device, checkpointer)
    bar = tqdm(total=total_steps, initial=start_step, disable=not master, dynamic_ncols=True)
    batches, t0, last_log, stop, last_acc = None, time.perf_counter(), start_step, False, None
    for step in range(start_step, total_steps + 1):
        last_step = step == total_steps
        epoch, offset = divmod(step, steps_per_epoch)

        # epoch end (and periodic) bookkeeping happens before the step it precedes: eval, checkpoint
        if step > start_step and (offset == 0 or last_step):
            acc = last_acc = evaluate_probe(cfg, model, val_loader, device, autocast) if has_val else None
            print0(f"epoch {epoch - 1 if offset == 0 else epoch} done | step {step} | probe top-1 {acc}")
            log(dict(step=step, epoch=epoch - (offset == 0), probe_acc=acc))
        if step > start_step and (offset == 0 or step % cfg.save_every == 0 or last_step):
            guard.check(ddp, step)  # never checkpoint weights that a non-finite loss has touched
            checkpointer.save(model, optimizer, sigreg, step, cfg)
        if last_step:
            break

        if batches is None or (offset == 0 and not cfg.streaming):  # new epoch, or resume mid-epoch
            batches = train_batches(cfg, train_ds, views, epoch, offset if batches is None else 0,
                                    rank, world, per_rank, steps_per_epoch, num_classes)
        lrs = [lr_at(step, total_steps, warmup, base, cfg.final_lr_div) for base in base_lrs]
        terms = train_step(train_model, optimizer, sigreg, next(batches), lrs, cfg, autocast, device)
        guard.update(step + 1, terms)  # device ops only: the check waits for the log interval
        bar.update(1)

        stopping = cfg.stop_after and step + 1 >= cfg.stop_after
        if (step + 1) % cfg.log_every == 0 or step == start_step or stopping:
            stop = guard.check(ddp, step + 1)  # the one host sync of a logging step; every rank decides alike
            checkpointer.check()
            elapsed, t0 = time.perf_counter() - t0, time.perf_counter()
            images_per_s, last_log = cfg.batch_size * (step + 1 - last_log) / elapsed, step + 1
            loss, inv, sig, probe_loss = terms.tolist()
            record = dict(step=step + 1, epoch=epoch, loss=loss, invariance=inv, sigreg=sig, probe_loss=probe_loss,
                          lr=lrs[0], images_per_s=images_per_s,
                          skipped_images=views.skipped.value)  # unreadable files so far (rank 0's share)
            bar.set_postfix(loss=f"{loss:.4f}", inv=f"{inv:.4f}", sigreg=f"{sig:.3f}", lr=f"{lrs[0]:.2e}",
                            img_s=f"{images_per_s:.0f}")
            log(record)
        if stop or stopping:
            checkpointer.save(model, optimizer, sigreg, step + 1, cfg)
            checkpointer.wait()
            print0(f"stopped after step {step + 1}{' (SIGTERM)' if stop else ''}; checkpoint {ckpt_path}; "
                   f"resume with the same command and --out_dir {cfg.out_dir}")
            break
    bar.close()
    checkpointer.wait()

    # end: check that DDP kept the ranks identical, export the backbone alone for timm
    skipped = torch.tensor(views.skipped.value, device=device)  # unreadable images replaced, all ranks
    if ddp:
        dist.all_reduce(skipped)
    if skipped:
        print0(f"skipped {skipped.item()} unreadable image(s) (each replaced by the next readable one; see warnings)")
    in_sync = params_in_sync(model)
    print0(f"parameters identical on all {world} ranks: {in_sync}")
    log(dict(step=step if last_step else step + 1, params_in_sync=in_sync))
    if not in_sync:
        raise RuntimeError("ranks hold different parameters")
    if last_step and master:
        write_atomic(model.backbone.state_dict(), os.path.join(cfg.out_dir, "backbone.pth"))  # the bare state dict
        export_for_hub(model.backbone, dataclasses.asdict(cfg), step, os.path.join(cfg.out_dir, "export"), last_acc)
    if master:
        log.close()
    if ddp:
        time.sleep(0.1)  # torch < 2.14: lets gloo's threads release their finished work first (else a hang at exit)
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, parse_config())
