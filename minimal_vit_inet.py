"""LeJEPA pretraining of any timm backbone on a Hugging Face image dataset (default: ViT-L/14 on ImageNet-1k).

LeJEPA (Balestriero & LeCun, arXiv 2511.08544): no teacher, no stop-gradient, no predictor. Each image gives
2 global + 6 local views; the loss pulls every view's projection towards the mean of the global views'
(invariance) and pushes the projections towards an isotropic Gaussian (SIGReg, sigreg.py):

    loss = (1 - lambda) * invariance + lambda * SIGReg,      lambda = 0.05

Reading order: Config | 1. views | 2. model | 3. loss | 4. optimiser and schedule | 5. training step |
6. main | then the plumbing: command line, processes and faults, data, checkpoints, logs, export.
Measured on one H100 (README): the official recipe's ViT-L/14 step runs at 197 images/s (231 compiled), no
host sync; resnet18 on CIFAR-10, 192 s of pretraining: linear probe 54.8% against 23.9% at random init.

    # one GPU, or the CPU (single process)
    python minimal_vit_inet.py --model vit_small_patch16_224 --local_size 96 --batch_size 256
    # one node, 8 GPUs: the official recipe (global batch 512 = 64 per GPU)
    torchrun --nproc_per_node=8 minimal_vit_inet.py
    # two nodes through torchrun's rendezvous (run on every node)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=lejepa minimal_vit_inet.py
    # offline: a local folder of images by class (root/train/<class>/*.jpg, optional root/validation/...)
    python minimal_vit_inet.py --dataset /data/imagenette --model vit_small_patch16_224 --local_size 96 \
        --epochs 800
    # resume: the same command with the same --out_dir continues where it stopped
ImageNet-1k (timm/imagenet-1k-wds) is gated: accept its terms on the hub and `hf auth login` first.
"""
import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import importlib.util
import itertools
import json
import math
import multiprocessing as mp
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import datasets
import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms as T
from torchvision.ops import MLP
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from sigreg import SIGReg


@dataclass
class Config:  # every field is a flag: --field value (bools: true / false)
    # data
    dataset: str = "timm/imagenet-1k-wds"  # hub id, local image folder (imagefolder) or save_to_disk folder
    dataset_config: str = ""  # hub config name ("" = default)
    dataset_revision: str = ""  # hub revision, e.g. refs/convert/parquet for frgfm/imagenette
    dataset_data_dir: str = ""  # hub sub-folder, e.g. 160px for frgfm/imagenette
    train_split: str = "train"
    val_split: str = "validation"  # labelled split for the online probe ("" or missing = no evaluation)
    image_column: str = ""  # "" = auto (Image feature, else image/img/jpg)
    label_column: str = ""  # "" = auto (ClassLabel, else label/cls/fine_label); labels only feed the probe
    num_classes: int = 0  # 0 = auto (ClassLabel, else max label + 1; 1000 for streamed imagenet-1k)
    streaming: bool = False  # stream hub data (no full download); shards split across ranks
    num_proc: int = 0  # processes preparing a downloaded dataset (timm/imagenet-1k-wds: 155 GB); 0 = one
    shuffle_buffer: int = 10_000  # streaming: images in one rank's shuffle buffers, split over its workers
    steps_per_epoch: int = 0  # 0 = dataset size // global batch (streaming: from the hub metadata)
    workers: int = 10  # DataLoader workers per rank: JPEG decoding, crops and flips happen there
    # views (official README table; paper ablation: 2 global + 6 local views is the sweet spot)
    n_global: int = 2  # global views; the invariance targets are their mean
    n_local: int = 6
    global_size: int = 224  # px
    local_size: int = 98  # px (14 divides both 224 and 98: one ViT-L/14 serves both)
    global_scale: tuple[float, float] = (0.3, 1.0)  # RandomResizedCrop area fraction
    local_scale: tuple[float, float] = (0.05, 0.3)
    # model
    model: str = "vit_large_patch14_224"  # any timm name (ViT, ConvNeXt, ResNet, ...), trained from scratch
    drop_path: float = 0.0  # stochastic depth; > 0 makes resume not bit-exact (its RNG is not saved)
    proj_hidden: int = 2048  # projector MLP width (BatchNorm + ReLU after each hidden layer)
    proj_dim: int = 128  # projector output: where invariance and SIGReg are measured
    compile: bool = False  # torch.compile the backbone
    # loss
    lamb: float = 0.05  # lambda: weight of SIGReg in (1 - lambda) * invariance + lambda * SIGReg
    num_slices: int = 1024  # SIGReg's random directions per step (paper: 1024)
    # optimisation (official README: AdamW, lr 5e-4, wd 5e-2 ViT / 5e-4 ResNet, warm-up + cosine to lr/1000)
    epochs: int = 100
    batch_size: int = 512  # GLOBAL images per step, split over ranks (paper ablation: 512 is best)
    lr: float = 5e-4  # peak learning rate, not scaled with the batch
    weight_decay: float = -1.0  # < 0 = auto: 5e-2 for ViTs, 5e-4 for convnets
    warmup_epochs: float = 10.0  # linear warm-up (the paper does not give its length; DINO uses 10)
    final_lr_div: float = 1000.0  # the cosine ends at lr / final_lr_div at the very last step
    probe_lr: float = 1e-3  # online probe (same schedule shape)
    probe_weight_decay: float = 1e-6
    bf16: bool = torch.cuda.is_available()  # bf16 autocast (no GradScaler: that is for fp16)
    seed: int = 0
    # logs and checkpoints
    out_dir: str = "out/lejepa"  # checkpoint, metrics.jsonl, exported backbone; a rerun resumes from here
    log_every: int = 10  # steps between metric lines (the only host syncs of training)
    save_every: int = 1000  # steps between checkpoints (also at every epoch end)
    stop_after: int = 0  # > 0: checkpoint and exit after this many steps (time-limited jobs)
    export: str = ""  # a ckpt.pt: write its export/ folder (timm's Hugging Face format) and exit
    tensorboard: bool = False  # also log to out_dir/tensorboard (pip install tensorboard)
    wandb: str = ""  # also log to this Weights & Biases project; a resumed run continues its wandb run


# ---------------------------------------------------------------------------------------------------------
# 1. Views. Seed README table: RandomResizedCrop, flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8,
# grayscale 0.2, Gaussian blur 0.5, solarize 0.2. DataLoader workers decode, crop, resize and flip, and draw
# every parameter; the colour ops run batched on the training device, each image with its own draws. The
# workers then make 7.8x to 8.2x the images/s per core of the plain torchvision v2 pipeline
# (bench/multicrop_bench.py); on an H100 the colour stage takes 15% of the official recipe's step
# (bench/gpu_check.py).

class MultiCrop:
    """mc(img, g) -> [(pixels uint8 (3, S, S), colour draws (11,))] for n_global, then n_local views.
    Every draw comes from the generator g, so a view depends only on the image and g's seed."""

    def __init__(self, global_size=224, local_size=98, n_global=2, n_local=6,
                 global_scale=(0.3, 1.0), local_scale=(0.05, 0.3)):
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.kinds = [(global_size, self.global_scale)] * n_global
        self.kinds += [(local_size, self.local_scale)] * n_local

    def __call__(self, img: Image.Image, generator: torch.Generator) -> list:
        img = img if img.mode == "RGB" else img.convert("RGB")
        draws = [self.params(*img.size, size, scale, generator) for size, scale in self.kinds]
        return [(self.view(img, p), p["colour"]) for p in draws]

    @staticmethod
    def params(width, height, size, scale, g) -> dict:
        """One view's draws, with torchvision's samplers. colour = [order of the 4 jitter ops (-1 x 4: no
        jitter), brightness, contrast, saturation, hue, grayscale 0|1, blur sigma (0: none), solarize 0|1]."""
        with drawing_from(g):
            shape = torch.empty(1, 1, 1).expand(3, height, width)  # get_params reads only the image's shape
            top, left, h, w = T.RandomResizedCrop.get_params(shape, scale, ratio=(3 / 4, 4 / 3))
            order, *factors = T.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
            sigma = T.GaussianBlur.get_params(0.1, 2.0)
            flip, jitter, gray, blur, solarize = torch.rand(5).tolist()
        order = order.tolist() if jitter < 0.8 else [-1] * 4
        colour = order + factors + [gray < 0.2, sigma if blur < 0.5 else 0.0, solarize < 0.2]
        return dict(size=size, box=(left, top, left + w, top + h), flip=flip < 0.5,
                    colour=torch.tensor(colour, dtype=torch.float32))

    @staticmethod
    def view(img, p) -> torch.Tensor:
        img = img.resize((p["size"], p["size"]), Image.BILINEAR, box=p["box"])  # crop + resize in one pass
        if p["flip"]:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return TF.pil_to_tensor(img)  # uint8: a quarter of float32's bytes through the queues and PCIe


@contextlib.contextmanager
def drawing_from(g: torch.Generator):
    """torchvision's get_params draw from the global RNG: run them on g's stream, and advance g."""
    if g is torch.default_generator:  # streaming: the worker's own RNG is the global one already
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(g.get_state())
        yield
        g.set_state(torch.get_rng_state())


# the 11 colour draws of a view: columns 0-3 the jitter order, then these (MultiCrop.params)
FACTORS, GRAY, SIGMA, SOLARIZE = 4, 8, 9, 10  # 4 jitter factors, grayscale 0|1, blur sigma, solarize 0|1


def colour_plan(colour: torch.Tensor):
    """The images each colour op applies to, from the draws (N, 11), computed in the DataLoader worker:
    (indices, sizes) of 18 groups (jitter slot 0..3 x op 0..3, grayscale, blur). Sent with the batch, it
    spares the device 18 nonzero() calls per view, each a host sync."""
    groups = [colour[:, slot] == k for slot in range(4) for k in range(4)]
    groups += [colour[:, GRAY] > 0, colour[:, SIGMA] > 0]
    indices = [g.nonzero().squeeze(1) for g in groups]
    return torch.cat(indices), [len(i) for i in indices]


def colour_augment(x: torch.Tensor, colour: torch.Tensor, plan=None) -> torch.Tensor:
    """uint8 views (N, 3, H, W) and their draws (N, 11) -> float, augmented and normalised. Each op runs on
    the images that drew it (indexing: torch.where over the batch made the stage 3.7x slower on the CPU);
    each follows torchvision's float kernel with a per-image argument. Given the plan (collate_views makes
    it), nothing here waits for the device."""
    indices, sizes = plan if plan is not None else colour_plan(colour.cpu())
    groups = indices.to(x.device, non_blocking=True).split(sizes)  # split by host ints: no sync
    x = x.float() / 255
    c = colour.view(-1, 11, 1, 1)  # broadcasts over channels and pixels
    jitter = [lambda img, f: blend(img, 0.0, f),  # brightness, contrast, saturation, hue; f (n, 1, 1, 1)
              lambda img, f: blend(img, grayscale(img).mean((2, 3), keepdim=True), f),
              lambda img, f: blend(img, grayscale(img), f), adjust_hue]
    for slot in range(4):  # each image's 4 jitter ops in its own random order
        for k, op in enumerate(jitter):
            i = groups[4 * slot + k]  # the images whose op in this slot is k
            x[i] = op(x[i], c[i, FACTORS + k:FACTORS + k + 1])
    gray, blur = groups[16], groups[17]
    x[gray] = grayscale(x[gray]).expand(-1, 3, -1, -1)
    x[blur] = gaussian_blur(x[blur], colour[blur, SIGMA])
    x = torch.where((c[:, SOLARIZE:SOLARIZE + 1] > 0) & (x >= 128 / 255), 1 - x, x)  # at 128 of 255
    return normalize(x, scale=1.0)


def grayscale(x):  # (N, 3, H, W) -> (N, 1, H, W), ITU-R 601-2 luma as torchvision
    return (x * channel_constant((0.2989, 0.587, 0.114), x.device)).sum(1, keepdim=True)


def blend(x, y, f):  # brightness (y = 0), contrast (y = mean grey), saturation (y = grey)
    return (f * x + (1 - f) * y).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotate the hue by shift turns, keeping saturation and value: with max, min, delta = max - min and the
    hue h in sixths of a turn, channel n (r: 5, g: 3, b: 1) is max - delta * clamp(min(k, 4 - k), 0, 1),
    k = (n + h) mod 6: the HSV -> RGB formula with S * V = delta."""
    r, g, b = x.unbind(1)
    hi, lo = x.amax(1), x.amin(1)
    delta = hi - lo
    d = torch.where(delta > 0, delta, 1.0)  # grey pixels keep delta = 0 whatever their hue
    h = torch.where(hi == r, (g - b) / d, torch.where(hi == g, (b - r) / d + 2, (r - g) / d + 4))
    h = h + 6 * shift.view(-1, 1, 1)
    ks = [(n + h) % 6 for n in (5, 3, 1)]
    return torch.stack([hi - delta * torch.clamp(torch.minimum(k, 4 - k), 0, 1) for k in ks], 1)


def gaussian_blur(x, sigma, size=23):
    """Per-image Gaussian blur, 23 taps as the official recipe's GaussianBlur, reflect padding; sigma 0 leaves
    the image as it is. x (N, C, H, W), sigma (N,)."""
    N, C, H, W = x.shape
    if N == 0:
        return x
    half = min(size // 2, H - 1, W - 1)
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N * C, taps): a kernel per image
    x = F.pad(x.reshape(1, N * C, H, W), (half,) * 4, mode="reflect")
    x = F.conv2d(x, k[:, None, None, :], groups=N * C)  # separable: rows, then columns
    return F.conv2d(x, k[:, None, :, None], groups=N * C).view(N, C, H, W)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalize(x: torch.Tensor, scale: float = 255.0, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W), or floats in [0, 1] with scale=1 -> normalised with mean and std (ImageNet's)."""
    mean, std = channel_constant(tuple(mean), x.device), channel_constant(tuple(std), x.device)
    return (x.float() / scale - mean) / std


@functools.cache
def channel_constant(values: tuple, device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1), built once per device: torch.tensor(..., device=cuda) in a step is a host sync."""
    return torch.tensor(values, device=device).view(1, 3, 1, 1)


def eval_transform(img: Image.Image, generator=None, size: int = 224) -> torch.Tensor:
    """The usual evaluation view, uint8: short side to size / 0.875, centre crop. generator is unused: the
    call is MultiCrop's, so ViewsDataset serves both."""
    img = TF.resize(img.convert("RGB"), int(size / 0.875), interpolation=TF.InterpolationMode.BICUBIC)
    return TF.pil_to_tensor(TF.center_crop(img, [size, size]))


# ---------------------------------------------------------------------------------------------------------
# 2. Model: timm backbone -> embedding (the probe reads it) -> projector (the loss reads it)

def build_backbone(name: str, img_size: int = 224, drop_path: float = 0.0) -> nn.Module:
    """A timm model from scratch without classifier: model(x) is the (B, D) embedding. ViTs get
    dynamic_img_size, so one model takes the global and the local views."""
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path)
    try:
        return timm.create_model(name, img_size=img_size, dynamic_img_size=True, **kwargs)
    except TypeError:  # a convnet: no img_size argument, and any size works anyway
        return timm.create_model(name, **kwargs)


class LeJEPA(nn.Module):
    """Backbone + projector, and the online probe on the detached embedding: one module, so DDP syncs all."""

    def __init__(self, backbone, proj_hidden, proj_dim, num_classes=0):
        super().__init__()
        D = backbone.num_features
        self.backbone = backbone
        # BatchNorm keeps the start away from the all-zero point, where SIGReg's gradient vanishes
        self.projector = MLP(D, [proj_hidden, proj_hidden, proj_dim], norm_layer=nn.BatchNorm1d)
        self.probe = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, num_classes)) if num_classes else None

    def forward(self, views: list, n_global: int):
        """V views (N, 3, H, W), globals first -> emb (V, N, D), proj (V, N, P), probe logits (G, N, C) or
        None. The probe learns from the global views only: it is evaluated on centre crops at that size."""
        V, N = len(views), views[0].shape[0]
        groups = [views[:n_global], views[n_global:]]  # one backbone call per resolution
        emb = torch.cat([self.backbone(torch.cat(g)) for g in groups if g])  # (V * N, D)
        proj = self.projector(emb).view(V, N, -1)
        logits = None
        if self.probe is not None:
            logits = self.probe(emb[:n_global * N].detach()).view(n_global, N, -1)
        return emb.view(V, N, -1), proj, logits


# ---------------------------------------------------------------------------------------------------------
# 3. Loss: invariance to the global views' mean + SIGReg on every view

def lejepa_loss(proj: torch.Tensor, n_global: int, sigreg: nn.Module, lamb: float):
    """proj (V, N, P), globals first -> (loss, invariance, sigreg). The invariance is the mean over views,
    images and dims of (z_vn - c_n)^2, c_n the mean of image n's global views: every view, globals included,
    is pulled to the centre. SIGReg is taken per view and averaged."""
    proj = proj.float()  # bf16 under autocast: the loss is taken in fp32
    centers = proj[:n_global].mean(0)  # (N, P)
    invariance = (proj - centers).square().mean()
    sig = sigreg(proj)  # fp32 inside, all-reduced over ranks: every rank must call it
    return (1 - lamb) * invariance + lamb * sig, invariance, sig


# ---------------------------------------------------------------------------------------------------------
# 4. Optimiser and schedule: AdamW; linear warm-up, then cosine down to lr / final_lr_div

def lr_at(step: int, total: int, warmup: int, lr: float, final_div: float = 1000.0) -> float:
    """The learning rate of step `step` in [0, total): warm-up up to lr, then down to lr / final_div."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    final = lr / final_div
    return final + (lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: LeJEPA, weight_decay: float, probe_wd: float):
    """No weight decay on biases and norm weights (1-D); the probe has its own lr and decay."""
    net = [p for name, p in model.named_parameters() if not name.startswith("probe.")]
    groups = [dict(params=[p for p in net if p.ndim >= 2], weight_decay=weight_decay, name="net"),
              dict(params=[p for p in net if p.ndim < 2], weight_decay=0.0, name="net")]
    if model.probe is not None:
        groups.append(dict(params=list(model.probe.parameters()), weight_decay=probe_wd, name="probe"))
    return groups


def build_training(cfg: Config, num_classes: int, device: torch.device):
    """-> (model, SIGReg, AdamW, peak lr of each parameter group)."""
    torch.manual_seed(cfg.seed)  # initial weights given by --seed (DDP then copies rank 0's to the others)
    backbone = build_backbone(cfg.model, cfg.global_size, cfg.drop_path)
    model = LeJEPA(backbone, cfg.proj_hidden, cfg.proj_dim, num_classes)
    # channels_last: convolutions 1.3x faster on the CPU (resnet18), and PyTorch's advice on GPUs
    model = model.to(device, memory_format=torch.channels_last)
    if cfg.compile:
        backbone.compile()  # in place: the state_dict keys stay those of the plain timm model
    sigreg = SIGReg(num_slices=cfg.num_slices, seed=cfg.seed).to(device)
    # official README: 5e-2 for ViTs (models with a patch embedding), 5e-4 for ResNets (and other convnets)
    wd = cfg.weight_decay if cfg.weight_decay >= 0 else 5e-2 if hasattr(backbone, "patch_embed") else 5e-4
    groups = param_groups(model, wd, cfg.probe_weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)  # fused: one kernel, no host sync
    base_lrs = [cfg.probe_lr if g["name"] == "probe" else cfg.lr for g in optimizer.param_groups]
    return model, sigreg, optimizer, base_lrs


# ---------------------------------------------------------------------------------------------------------
# 5. Training step: views -> embeddings -> loss -> AdamW, with no host sync

def train_step(model, optimizer, sigreg, batch, lrs, cfg, autocast, device) -> torch.Tensor:
    """One step. The colour plan comes with the batch, copies are non-blocking (pinned memory on a GPU) and
    nothing is read back. Returns (loss, invariance, sigreg, probe_loss), on the device."""
    views, labels = batch
    xs = [colour_augment(x.to(device, non_blocking=True), c.to(device, non_blocking=True), plan)
          .contiguous(memory_format=torch.channels_last) for x, c, plan in views]  # V x (N, 3, H, W)
    labels = labels.to(device, non_blocking=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    with autocast:
        emb, proj, logits = model(xs, cfg.n_global)  # (V, N, D), (V, N, P), (G, N, C)
        loss, inv, sig = lejepa_loss(proj, cfg.n_global, sigreg, cfg.lamb)
        probe_loss = torch.zeros((), device=device)
        if logits is not None:  # its input is detached: the probe never shapes the backbone
            targets = labels.repeat(cfg.n_global)  # (G * N,): the logits are view-major
            probe_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets)
    optimizer.zero_grad(set_to_none=True)
    (loss + probe_loss).backward()
    optimizer.step()
    return torch.stack([loss, inv, sig, probe_loss]).detach()


def evaluate_probe(model, loader, device, autocast) -> float:
    """Top-1 of the online probe on the validation split, all ranks' shares together."""
    model.eval()
    counts = torch.zeros(2, device=device)  # correct, total: no host sync until the end
    with torch.no_grad(), autocast:
        for x, y in loader:
            x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            counts[0] += (model.probe(model.backbone(x)).argmax(-1) == y).sum()
            counts[1] += len(y)
    if dist.is_initialized():
        dist.all_reduce(counts)
    model.train()
    return (counts[0] / counts[1].clamp(min=1)).item()


# ---------------------------------------------------------------------------------------------------------
# 6. main: set up, then the loop. Epoch ends and checkpoints come before the step they precede, so the last
# step (step == total) evaluates, saves and exports in the same place.

def main(cfg: Config):
    if cfg.export:
        return export_checkpoint(cfg.export)
    ddp, rank, world, device = setup_distributed()
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())  # preemption: checkpoint, then exit
    ckpt_path, saved_step = claim_out_dir(cfg, rank, world)
    if cfg.stop_after and saved_step >= cfg.stop_after:
        print0(f"nothing to do: {ckpt_path} is at step {saved_step}, --stop_after {cfg.stop_after}")
        return
    data = load_data(cfg, rank, world)
    model, sigreg, optimizer, base_lrs = build_training(cfg, data.num_classes, device)
    seed_rank(cfg.seed, rank)  # from here each rank draws its own (stochastic depth, streamed views)
    start = load_checkpoint(ckpt_path, model, optimizer, sigreg) if os.path.exists(ckpt_path) else 0
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    total, warmup = cfg.epochs * data.steps_per_epoch, round(cfg.warmup_epochs * data.steps_per_epoch)
    print_setup(cfg, data, model, optimizer, world, device, total, warmup, start)
    log = Logger(cfg, start) if rank == 0 else None
    checkpointer = Checkpointer(ckpt_path, start, writer=rank == 0)
    guard = Guard(device, checkpointer)
    bar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
    batches, acc = None, None
    for step in range(start, total + 1):
        last_step = step == total
        epoch, offset = divmod(step, data.steps_per_epoch)
        if step > start and offset == 0:  # the step before ended an epoch (total: a whole number of epochs)
            acc = end_epoch(model, data, device, autocast, step, epoch - 1, log)
        if step > start and (offset == 0 or step % cfg.save_every == 0):
            guard.check(ddp, step)  # never checkpoint weights that a non-finite loss touched
            checkpointer.save(model, optimizer, sigreg, step, cfg)
        if last_step:
            break
        if batches is None or (offset == 0 and not cfg.streaming):  # a new epoch, or a resume mid-epoch
            batches = train_batches(cfg, data.train, data.views, epoch, offset if batches is None else 0,
                                    rank, world, data.per_rank, data.steps_per_epoch, data.num_classes)
        lrs = [lr_at(step, total, warmup, base, cfg.final_lr_div) for base in base_lrs]
        terms = train_step(train_model, optimizer, sigreg, next(batches), lrs, cfg, autocast, device)
        done = step + 1  # steps completed
        guard.update(done, terms)  # on the device: read back at the log interval
        bar.update(1)
        stopping = cfg.stop_after and done >= cfg.stop_after
        if done % cfg.log_every == 0 or step == start or stopping:
            sigterm = log_step(cfg, done, epoch, terms, lrs, guard, ddp, data, bar, log)
            if sigterm or stopping:
                stop_early(cfg, checkpointer, model, optimizer, sigreg, done, sigterm)
                break
    bar.close()
    checkpointer.wait()  # its step is now the model's: total, or where the run stopped early
    finish(cfg, model, data, device, checkpointer.step, log, ddp, acc, export=last_step)


def end_epoch(model, data, device, autocast, step, epoch, log):
    """Evaluate the online probe (when there is a validation split) and log it."""
    acc = None
    if data.val_loader is not None:
        acc = evaluate_probe(model, data.val_loader, device, autocast)
    print0(f"epoch {epoch} done | step {step}" + (f" | probe top-1 {acc:.4f}" if acc is not None else ""))
    if log:
        log(dict(step=step, epoch=epoch, probe_acc=acc))
    return acc


def log_step(cfg, step, epoch, terms, lrs, guard, ddp, data, bar, log) -> bool:
    """The log interval: the one host sync of training. True when a SIGTERM reached any rank."""
    stop = guard.check(ddp, step)  # every rank decides alike
    if log:  # rank 0; skipped_images: unreadable files so far (its share)
        loss, inv, sig, probe_loss = terms.tolist()
        images_per_s = log.images_per_s(step, cfg.batch_size)
        bar.set_postfix(loss=f"{loss:.4f}", inv=f"{inv:.4f}", sigreg=f"{sig:.3f}", lr=f"{lrs[0]:.2e}",
                        img_s=f"{images_per_s:.0f}")
        log(dict(step=step, epoch=epoch, loss=loss, invariance=inv, sigreg=sig, probe_loss=probe_loss,
                 lr=lrs[0], images_per_s=images_per_s, skipped_images=data.views.skipped.value))
    return stop


def stop_early(cfg, checkpointer, model, optimizer, sigreg, step, sigterm):
    """--stop_after or a SIGTERM (preemption): checkpoint and say how to resume."""
    checkpointer.save(model, optimizer, sigreg, step, cfg)
    checkpointer.wait()
    print0(f"stopped after step {step}{' (SIGTERM)' if sigterm else ''}; checkpoint {checkpointer.path}; "
           f"resume with the same command and --out_dir {cfg.out_dir}")


def finish(cfg, model, data, device, step, log, ddp, acc, export: bool):
    """Report skipped files, check that DDP kept the ranks identical, and export the trained backbone."""
    skipped = torch.tensor(data.views.skipped.value, device=device)  # unreadable images, all ranks
    if ddp:
        dist.all_reduce(skipped)
    if skipped:
        print0(f"skipped {skipped.item()} unreadable image(s) (each replaced by the next readable one)")
    in_sync = params_in_sync(model)
    print0(f"parameters identical on all {dist.get_world_size() if ddp else 1} ranks: {in_sync}")
    if log:
        log(dict(step=step, params_in_sync=in_sync))
    if not in_sync:
        raise RuntimeError("ranks hold different parameters")
    if log and export:
        write_atomic(model.backbone.state_dict(), os.path.join(cfg.out_dir, "backbone.pth"))
        export_for_hub(model.backbone, dataclasses.asdict(cfg), step, os.path.join(cfg.out_dir, "export"),
                       acc)
    if log:
        log.close()
    close_distributed(ddp)


# =========================================================================================================
# Plumbing: the command line, processes and faults, data, checkpoints, logs, export
# =========================================================================================================

def parse_config(argv=None) -> Config:
    """argparse generated from the dataclass, then every check that can fail before heavy work."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif "tuple" in str(f.type):  # the crop scales: two numbers
            p.add_argument(f"--{f.name}", type=float, nargs=2, default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()})
    positive = ["batch_size", "global_size", "local_size", "num_slices", "proj_hidden", "proj_dim", "epochs",
                "lr", "log_every", "save_every", "shuffle_buffer", "final_lr_div"]
    not_negative = ["workers", "num_proc", "num_classes", "steps_per_epoch", "stop_after", "warmup_epochs",
                    "n_local", "drop_path"]
    checks = [(getattr(cfg, k) > 0, f"--{k} must be > 0, got {getattr(cfg, k)}") for k in positive]
    checks += [(getattr(cfg, k) >= 0, f"--{k} must be >= 0, got {getattr(cfg, k)}") for k in not_negative]
    local = cfg.dataset.startswith(("/", ".", "~")) or cfg.dataset.count("/") > 1  # a path, not owner/name
    checks += [
        (0 <= cfg.lamb <= 1, f"--lamb must be in [0, 1], got {cfg.lamb}"),
        (cfg.n_global >= 1, f"--n_global must be >= 1 (the invariance targets are the global views), "
                            f"got {cfg.n_global}"),
        (cfg.drop_path < 1, f"--drop_path must be < 1, got {cfg.drop_path}"),
        (all(0 < a <= b <= 1 for a, b in (cfg.global_scale, cfg.local_scale)),
         f"crop scales need 0 < min <= max <= 1, got {cfg.global_scale} and {cfg.local_scale}"),
        (cfg.warmup_epochs < cfg.epochs, f"--warmup_epochs {cfg.warmup_epochs} is not shorter than --epochs "
         f"{cfg.epochs}: the learning rate would never reach its peak; pass a shorter warm-up, e.g. "
         f"--warmup_epochs {cfg.epochs / 10:g}"),
        (timm.is_model(cfg.model), f"unknown timm model {cfg.model!r}; see timm.list_models('*vit*')"),
        (not cfg.tensorboard or importlib.util.find_spec("tensorboard"),
         "--tensorboard needs: pip install tensorboard"),
        (not cfg.wandb or importlib.util.find_spec("wandb"),
         "--wandb needs: pip install wandb (and wandb login)"),
        (not local or os.path.isdir(cfg.dataset),
         f"--dataset {cfg.dataset}: no such folder (a local dataset is a folder; a hub id is owner/name)"),
    ]
    for ok, msg in checks:
        if not ok:
            sys.exit(f"error: {msg}")
    patch = patch_size(cfg.model)
    if cfg.global_size % patch or cfg.local_size % patch:
        glob, loc = [round(s / patch) * patch for s in (cfg.global_size, cfg.local_size)]  # nearest multiples
        sys.exit(f"error: {cfg.model} cuts images into {patch} px patches: --global_size {cfg.global_size} "
                 f"and --local_size {cfg.local_size} must be multiples of {patch}, e.g. {glob} and {loc}")
    return cfg


def patch_size(model: str) -> int:
    """A ViT's patch size in px (views must be multiples of it); 1 for a convnet, or when it cannot be told.
    Built on the meta device: no memory, a tenth of a second for ViT-L."""
    try:
        with torch.device("meta"):
            backbone = build_backbone(model)
    except Exception:  # not buildable on the meta device: the run itself will say what timm thinks
        return 1
    size = getattr(getattr(backbone, "patch_embed", None), "patch_size", 1)  # none: a convnet
    return size[0] if isinstance(size, (tuple, list)) else int(size)


# --- Processes and faults. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; plain `python` runs one process.
# A run ends at once when anything fails (run), never hangs on a dead launcher or rank, keeps one writer
# per out_dir (claim_out_dir) and checkpoints on SIGTERM.

# Collectives wait this long for a slow rank (NCCL's default: 10 minutes): rank 0 writing a checkpoint to a
# network filesystem, another node still preparing the dataset. A rank that fails exits at once instead.
DIST_TIMEOUT = datetime.timedelta(minutes=60)


def setup_distributed():
    ddp = "RANK" in os.environ
    rank, world, local_rank = 0, 1, 0
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=DIST_TIMEOUT)
        exit_with_launcher()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return ddp, rank, world, device


def close_distributed(ddp: bool):
    if ddp:
        time.sleep(0.1)  # torch < 2.14: lets gloo's threads release their finished work (else a hang at exit)
        dist.destroy_process_group()


def run(main, *args):
    """Call main; on any error end this process at once, non-zero, with the traceback (or sys.exit's line).
    os._exit skips the exit handlers, which would wait forever for DataLoader workers (they outlive a
    SIGTERM, below); the workers see their parent gone and exit. torchrun then stops the other ranks."""
    try:
        main(*args)
    except BaseException as err:  # KeyboardInterrupt and SystemExit too
        code = 1
        if isinstance(err, SystemExit):
            code = err.code or 0  # sys.exit(), sys.exit(2), or sys.exit("error: ...")
            if isinstance(code, str):
                print_err(code)
                code = 1
        else:
            rank = os.environ.get("RANK")
            print_err(f"error on rank {rank}:" if rank else "error:")
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def exit_with_launcher(poll_s: float = 1.0):
    """End this rank soon after torchrun dies (OOM killer, kill -9, a closed shell): ranks live in sessions
    of their own and would otherwise train on, writing to out_dir."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:  # re-parented once the launcher is gone
            time.sleep(poll_s)
        print_err(f"error: rank {os.environ.get('RANK')}: torchrun (pid {launcher}) is gone; exiting")
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def print_err(line: str):
    """One line to stderr in one write, newline included: print() writes the text, then the newline, and
    another rank's line can land in between (ranks share torchrun's stderr)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


STOP = threading.Event()  # set by SIGTERM (preemption): the loop checkpoints and exits
LOCK = {"fd": None}  # out_dir's open lock file; the OS releases the lock when the process dies


def claim_out_dir(cfg: Config, rank: int, world: int):
    """Refuse, touching nothing, a batch that does not split over the ranks, and an out_dir that holds another
    run's checkpoint or is in use; rank 0 then holds its lock until it exits. -> (checkpoint path, its step
    or 0)."""
    if cfg.batch_size % world:
        sys.exit(f"error: --batch_size {cfg.batch_size} is not divisible by the world size {world}")
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    step = check_same_run(path, cfg) if os.path.exists(path) else 0
    holder = [lock_out_dir(cfg.out_dir) if rank == 0 else 0]
    if world > 1:
        dist.broadcast_object_list(holder, src=0)  # every rank learns the holder's pid
    if holder[0]:
        sys.exit(f"error: {cfg.out_dir} is in use by another run (pid {holder[0]} holds {cfg.out_dir}/lock); "
                 f"wait for it to end, stop it, or pass another --out_dir")
    return path, step


def lock_out_dir(out_dir: str) -> int:
    """flock out_dir/lock and write our pid in it. -> 0, or the pid of the process holding it. A lock file
    that exists is opened without being written; a crashed holder leaves no stale lock."""
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


def _worker_init(worker_id):
    """DataLoader workers serve batches for 60 s after a SIGTERM to the process group, so that the main
    process reaches its checkpoint, then end (an exit handler waiting on them must not wait forever). They
    drop the inherited lock descriptor: the lock goes when the main process dies."""
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(60))  # SIGALRM's default action ends the worker
    if LOCK["fd"] is not None:
        os.close(LOCK["fd"])


class Guard:
    """Stops every rank alike on a non-finite loss or a SIGTERM. update() keeps the first non-finite step and
    its loss terms on the device; check() reads them back, all-reduced: one host sync, at the log interval
    and before every checkpoint, so no checkpoint holds weights that a non-finite loss touched."""

    def __init__(self, device, checkpointer):
        self.first_bad = torch.zeros(5, device=device)  # step (0: none), loss, invariance, sigreg, probe_loss
        self.checkpointer = checkpointer

    def update(self, step: int, terms: torch.Tensor):
        new = ~torch.isfinite(terms).all() & (self.first_bad[0] == 0)
        record = torch.cat([terms.new_full((1,), step), terms.float()])
        self.first_bad = torch.where(new, record, self.first_bad)

    def check(self, ddp: bool, step: int) -> bool:
        """True when a SIGTERM reached any rank; exits with one line when any rank saw a non-finite loss, and
        raises a failed checkpoint write."""
        self.checkpointer.check()
        flags = torch.stack([self.first_bad[0], self.first_bad.new_full((), float(STOP.is_set()))])
        if ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_step, stop = flags.tolist()
        if bad_step:
            at, loss, inv, sig, probe = self.first_bad.tolist()
            where = f"at step {int(at)}: loss {loss} invariance {inv} sigreg {sig} probe {probe}" if at else \
                f"on another rank at step {int(bad_step)}"
            ckpt = self.checkpointer
            ckpt.wait()  # a checkpoint being written is complete before the process ends
            last = "no checkpoint yet"
            if ckpt.step:
                last = f"the last good checkpoint is {ckpt.path} (step {ckpt.step})"
            sys.exit(f"error: non-finite loss {where}; stopped at step {step}, {last}")
        return bool(stop)


def params_in_sync(model: nn.Module) -> bool:
    """The ranks' parameters agree: per-tensor checksums (sum, sum of squares, in float64), gathered."""
    if not dist.is_initialized():
        return True
    sums = [torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()]
    check = torch.stack(sums)  # (parameters, 2)
    gathered = [torch.empty_like(check) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, check)
    return all(torch.equal(gathered[0], g) for g in gathered)


# --- Data: load a split (hub, image folder or save_to_disk folder), find its columns, serve the views.

def load_data(cfg: Config, rank: int, world: int):
    """The training set and its views, the validation loader, the classes and the steps of an epoch. Every
    rank loads: datasets' file locks let one process per node prepare the cache while the others wait."""
    hub = dict(config=cfg.dataset_config, streaming=cfg.streaming, revision=cfg.dataset_revision,
               data_dir=cfg.dataset_data_dir, num_proc=cfg.num_proc)
    train = load_split(cfg.dataset, cfg.train_split, **hub)
    val = load_split(cfg.dataset, cfg.val_split, missing_ok=True, **hub) if cfg.val_split else None
    try:
        image_col, label_col = find_columns(train, cfg.image_column, cfg.label_column)
    except ValueError as err:
        sys.exit(f"error: {cfg.dataset}: {err}")
    found = count_classes(train, label_col, cfg.dataset) if label_col else 0
    if cfg.num_classes and found > cfg.num_classes:
        sys.exit(f"error: --num_classes {cfg.num_classes} is too few: the labels of {cfg.dataset} "
                 f"({label_col!r}) go up to {found - 1}; pass --num_classes {found} or leave it at 0 (auto)")
    if cfg.num_classes and not label_col:
        sys.exit(f"error: --num_classes {cfg.num_classes}, but {cfg.dataset} has no label column for the "
                 f"probe; pass --label_column, or leave --num_classes at 0")
    num_classes = cfg.num_classes or found
    if label_col and not num_classes:
        sys.exit(f"error: cannot count the classes of the streamed {cfg.dataset} (no ClassLabel); "
                 f"pass --num_classes")
    multicrop = MultiCrop(cfg.global_size, cfg.local_size, cfg.n_global, cfg.n_local, cfg.global_scale,
                          cfg.local_scale)
    if cfg.streaming:  # each worker holds its own buffer (undecoded images, ~110 kB each for ImageNet)
        buffer = max(1, cfg.shuffle_buffer // max(1, cfg.workers))
        train = split_dataset_by_node(train.shuffle(cfg.seed, buffer_size=buffer), rank, world)
        n_train = getattr((train.info.splits or {}).get(cfg.train_split), "num_examples", 0)
        views = StreamViews(train, image_col, label_col, multicrop)
    else:
        n_train, views = len(train), ViewsDataset(train, image_col, label_col, multicrop, cfg.seed)
    steps = cfg.steps_per_epoch or n_train // cfg.batch_size
    if steps <= 0:
        sys.exit(f"error: cannot derive steps per epoch ({n_train} images, batch {cfg.batch_size}); "
                 f"pass --steps_per_epoch")
    if not cfg.streaming and steps > n_train // cfg.batch_size:  # an epoch is one pass, no repeats
        sys.exit(f"error: --steps_per_epoch {steps} x --batch_size {cfg.batch_size} exceeds the {n_train} "
                 f"images of {cfg.dataset}; at most {n_train // cfg.batch_size} (use --epochs for more)")
    per_rank = cfg.batch_size // world
    has_val = val is not None and num_classes > 0 and label_col in (val.features or {})
    val_loader = eval_loader(cfg, val, image_col, label_col, rank, world, per_rank) if has_val else None
    return argparse.Namespace(train=train, views=views, val_loader=val_loader, num_classes=num_classes,
                              steps_per_epoch=steps, per_rank=per_rank)


def load_split(dataset: str, split: str, config: str = "", streaming: bool = False, missing_ok: bool = False,
               revision: str = "", data_dir: str = "", num_proc: int = 0):
    """One split of a hub dataset, a local image folder (imagefolder) or a save_to_disk folder; with
    missing_ok, None when there is no such split (e.g. no validation folder)."""
    prepare = dict(num_proc=num_proc) if num_proc and not streaming else {}
    is_dir = os.path.isdir(dataset)
    try:
        if is_dir and os.path.exists(os.path.join(dataset, "dataset_dict.json")):
            ds = datasets.load_from_disk(dataset)[split]  # a DatasetDict written by save_to_disk
        elif is_dir and os.path.exists(os.path.join(dataset, "dataset_info.json")):
            ds = datasets.load_from_disk(dataset)  # one saved split: it answers to "train" and its own name
            if split not in ("train", str(ds.split)):
                raise KeyError(split)
        elif is_dir:
            ds = datasets.load_dataset("imagefolder", data_dir=dataset, split=split, streaming=streaming,
                                       **prepare)
        else:
            ds = datasets.load_dataset(dataset, config or None, split=split, streaming=streaming,
                                       revision=revision or None, data_dir=data_dir or None, **prepare)
    except (ValueError, KeyError) as err:  # an unknown split (KeyError: of a save_to_disk folder) or config
        if missing_ok and (isinstance(err, KeyError) or "split" in str(err)):
            return None
        sys.exit(f"error: {dataset}: {hub_error(dataset, config, split, err)}")
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as err:
        sys.exit(f"error: {dataset}: {hub_error(dataset, config, split, err)}")
    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset(num_shards=min(64, len(ds)))  # local data, streamed like the hub
    return ds


def hub_error(dataset: str, config: str, split: str, err: Exception) -> str:
    """datasets' error, as one line that says what to do."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "gated" in text:
        return (f"gated on the hub: accept its terms at https://huggingface.co/datasets/{dataset} and log in "
                f"(hf auth login)")
    if isinstance(err, ConnectionError):
        return (f"cannot reach the Hugging Face hub ({text}); offline, use a local copy: --dataset FOLDER "
                f"(images in FOLDER/train/<class>/, or a save_to_disk folder), or HF_HUB_OFFLINE=1 with a "
                f"cached copy")
    if "doesn't exist" in text or isinstance(err, FileNotFoundError):
        return f"no such dataset on the hub, or no access to it ({text}); check the id (owner/name)"
    if "BuilderConfig" in text:
        return f"no config {config!r} ({text}); pass --dataset_config with one of those"
    if "split" in text or isinstance(err, KeyError):  # KeyError: a split a save_to_disk folder lacks
        return f"no split {split!r} ({text})"
    return text


def find_columns(ds, image_column: str = "", label_column: str = ""):
    """(image column, label column or None): Image / ClassLabel features first, then common names."""
    feats = ds.features or {}
    names = list(feats) or list(ds.column_names or [])

    def find(given, feature, common):
        typed = [k for k, v in feats.items() if isinstance(v, feature)]
        return given or next(iter(typed + [k for k in common if k in names]), None)

    image = find(image_column, datasets.Image, ("image", "img", "jpg", "png"))
    label = find(label_column, datasets.ClassLabel, ("label", "cls", "fine_label", "labels"))
    if image is None:
        raise ValueError(f"no image column found among {names}; pass --image_column")
    return image, label


def count_classes(ds, label_col, dataset_name: str = "") -> int:
    """ClassLabel's count, else max label + 1 (map-style) or 1000 for ImageNet-1k; 0 when unknown."""
    feat = (ds.features or {}).get(label_col)
    if isinstance(feat, datasets.ClassLabel):
        return feat.num_classes
    if isinstance(ds, datasets.Dataset):
        return int(max(ds[label_col])) + 1
    return 1000 if "imagenet-1k" in dataset_name else 0


def seed_rank(seed: int, rank: int):
    """Seed the global RNG by (seed, rank): what each rank draws on its own."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One sample's augmentation seed: the same for any worker count, world size or resume point."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


# what PIL raises for truncated, corrupt or unsupported files (DecompressionBombError: absurdly large images)
BAD_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def skip_bad_image(counter, index, err):
    """Count (in a counter shared by the DataLoader workers) and report an image that cannot be used."""
    with counter.get_lock():
        counter.value += 1
    print_err(f"warning: skipped unreadable image #{index}: {type(err).__name__}: {err}")


class ViewsDataset(torch.utils.data.Dataset):
    """Map-style: item (epoch, index) -> (views, label). A file that cannot be decoded is replaced by the
    next readable one, so batches stay full and ranks step alike: web-scraped sets hold broken files."""

    def __init__(self, ds, image_col, label_col, multicrop, seed):
        self.ds, self.image_col, self.label_col, self.mc = ds, image_col, label_col, multicrop
        self.seed = seed
        self.skipped = mp.Value("i", 0)  # shared with the DataLoader's workers

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, i = key
        for j in range(i, i + 100):
            j %= len(self.ds)
            try:
                row = self.ds[j]  # decodes the image, in a worker
                g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, j))
                return self.mc(row[self.image_col], g), (row[self.label_col] if self.label_col else -1)
            except BAD_IMAGE as err:
                skip_bad_image(self.skipped, j, err)
        raise RuntimeError(f"100 unreadable images in a row from #{i}: "
                           f"is --image_column {self.image_col!r} right?")


class StreamViews(torch.utils.data.IterableDataset):
    """Streaming: (views, label) from a datasets.IterableDataset, which splits its shards over the workers.
    Views use each worker's own RNG (seeded by the DataLoader), so a streamed resume is not exact."""

    def __init__(self, ds, image_col, label_col, transform):
        self.ds, self.image_col, self.label_col, self.transform = ds, image_col, label_col, transform
        self.skipped = mp.Value("i", 0)

    def __iter__(self):
        ds = self.ds  # decoded below, to catch broken files (IterableDataset.decode needs datasets >= 3.4)
        if isinstance((ds.features or {}).get(self.image_col), datasets.Image):
            ds = ds.cast_column(self.image_col, datasets.Image(decode=False))
            ds.set_epoch(self.ds.epoch)  # the cast copy starts at epoch 0
        for n, row in enumerate(ds):
            image = row[self.image_col]
            try:
                image = datasets.Image().decode_example(image) if isinstance(image, dict) else image
                views = self.transform(image, torch.default_generator)
            except BAD_IMAGE as err:
                skip_bad_image(self.skipped, n, err)
                continue
            yield views, (row[self.label_col] if self.label_col else -1)


def collate_views(items, num_classes: int = 0):
    """In the worker: [(views, label)] * N -> ([(pixels (N, 3, S, S), colour (N, 11), colour_plan)] * V,
    labels (N,)). Labels beyond the probe's classes are refused (a stream shows its labels only here)."""
    views, labels = zip(*items)
    if num_classes and max(labels) >= num_classes:
        raise ValueError(f"label {max(labels)} is beyond --num_classes {num_classes}")
    batch = []
    for view in zip(*views):  # the v-th view of every image
        pixels, colour = torch.stack([p for p, _ in view]), torch.stack([c for _, c in view])
        batch.append((pixels, colour, colour_plan(colour)))
    return batch, torch.tensor(labels)


def train_batches(cfg, ds, views, epoch, skip, rank, world, per_rank, steps_per_epoch, num_classes=0):
    """Map-style: one epoch's batches on this rank, after `skip` of them (a resume mid-epoch). Streaming:
    every batch from `epoch` on; epoch ends do not restart the stream, so its buffers fill once per pass."""
    loader = functools.partial(DataLoader, views, per_rank, num_workers=cfg.workers, drop_last=True,
                               pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                               collate_fn=functools.partial(collate_views, num_classes=num_classes))
    if isinstance(ds, datasets.Dataset):  # DistributedSampler's order; skipped batches are not decoded
        sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)  # a new permutation each epoch, the same on all ranks
        order = list(sampler)[skip * per_rank: steps_per_epoch * per_rank]
        yield from loader(sampler=[(epoch, i) for i in order])
        return
    for stream_pass in itertools.count(epoch):  # a rank whose shards run dry starts the next pass at once
        ds.set_epoch(stream_pass)  # reshuffles shards and buffers, alike on all ranks
        got = 0
        for batch in loader():
            got += 1
            if got > skip:  # skipped batches are decoded: a stream cannot seek
                yield batch
        if got == 0:
            raise RuntimeError(f"rank {rank}: the stream gave no full batch of {per_rank} images")
        skip = max(0, skip - got)


def eval_loader(cfg, ds, image_col, label_col, rank, world, per_rank):
    """Validation batches (uint8 centre crops, labels); each rank a disjoint share, nothing repeated."""
    transform = functools.partial(eval_transform, size=cfg.global_size)
    loader = functools.partial(DataLoader, batch_size=per_rank, num_workers=cfg.workers,
                               worker_init_fn=_worker_init, pin_memory=torch.cuda.is_available())
    if isinstance(ds, datasets.Dataset):
        data = ViewsDataset(ds, image_col, label_col, transform, cfg.seed)
        return loader(data, sampler=[(0, i) for i in range(rank, len(ds), world)])
    return loader(StreamViews(split_dataset_by_node(ds, rank, world), image_col, label_col, transform))


# --- Checkpoints: a plain dict, written atomically by rank 0, off the training path; resume reads it back.

def checkpoint_state(model: LeJEPA, optimizer, sigreg, step: int, cfg: Config) -> dict:
    return dict(backbone=model.backbone.state_dict(), projector=model.projector.state_dict(),
                probe=model.probe.state_dict() if model.probe is not None else None,
                optimizer=optimizer.state_dict(), sigreg=sigreg.state_dict(), step=step,
                config=dataclasses.asdict(cfg))


def write_atomic(obj, path: str):
    tmp = path + ".tmp"  # same folder: os.replace is atomic, a crash never leaves half a file
    with open(tmp, "wb") as f:  # open() ourselves: a bad path raises the OS's error on every torch version
        torch.save(obj, f)
    os.replace(tmp, path)


class Checkpointer:
    """save() copies the state into CPU buffers kept from one save to the next (pinned on a GPU), the loop's
    only pause, and a thread writes the copy. ViT-L + AdamW (3.7 GB) on the 2-core CPU: the loop pauses
    1.4 s against 3.4 s for torch.save (bench/checkpoint_bench.py). A failed write is raised in the loop."""

    def __init__(self, path: str, step: int, writer: bool):
        self.path, self.step, self.writer = path, step, writer  # step of the last checkpoint, 0 = none
        self.thread, self.error, self.buffers = None, None, []

    def save(self, model, optimizer, sigreg, step: int, cfg: Config):
        self.wait()  # one write at a time
        self.step = step
        if self.writer:  # every rank calls save(); rank 0 writes
            state = self.snapshot(checkpoint_state(model, optimizer, sigreg, step, cfg))
            self.thread = threading.Thread(target=self._write, args=(state,), name="checkpoint-writer")
            self.thread.start()

    def snapshot(self, state: dict) -> dict:
        """state with its tensors copied into the kept buffers (fresh buffers made a save 2.2x slower)."""
        leaves, spec = pytree.tree_flatten(state)
        tensors = [t for t in leaves if torch.is_tensor(t)]
        layout = [(t.shape, t.stride(), t.dtype) for t in tensors]
        if [(b.shape, b.stride(), b.dtype) for b in self.buffers] != layout:
            # empty_like keeps the strides: fused AdamW reads its state in the parameters' layout
            self.buffers = [torch.empty_like(t, device="cpu", pin_memory=t.is_cuda) for t in tensors]
        for b, t in zip(self.buffers, tensors):
            b.copy_(t.detach(), non_blocking=True)
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()  # the copies are complete before the thread reads them
        copies = iter(self.buffers)
        return pytree.tree_unflatten([next(copies) if torch.is_tensor(x) else x for x in leaves], spec)

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
    """The step of the checkpoint at `path`; exits with one line, touching nothing, if another run's."""
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
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.backbone.load_state_dict(ckpt["backbone"])
    model.projector.load_state_dict(ckpt["projector"])
    if model.probe is not None and ckpt["probe"] is not None:
        model.probe.load_state_dict(ckpt["probe"])
    optimizer.load_state_dict(ckpt["optimizer"])
    sigreg.load_state_dict(ckpt["sigreg"])  # its step counter: the next step draws the slices it would have
    return ckpt["step"]


# --- Logs: the set-up on stdout; metrics.jsonl, mirrored to TensorBoard and Weights & Biases when asked.

def print_setup(cfg, data, model, optimizer, world, device, total, warmup, start):
    """The versions, the resolved config and the derived numbers, on stdout and in out_dir/config.json."""
    V, D = cfg.n_global + cfg.n_local, model.backbone.num_features
    params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    print0(f"torch {torch.__version__} | timm {timm.__version__} | datasets {datasets.__version__} | "
           f"{world} process(es) on {device.type} | {'bf16' if cfg.bf16 else 'fp32'}")
    print0("config: " + json.dumps(dataclasses.asdict(cfg)))
    print0(f"derived: global batch {cfg.batch_size} ({data.per_rank}/rank) | views/step {V * cfg.batch_size} "
           f"({cfg.n_global}x{cfg.global_size}px + {cfg.n_local}x{cfg.local_size}px per image) | "
           f"steps/epoch {data.steps_per_epoch} | total steps {total} | warm-up {warmup} | "
           f"wd {optimizer.param_groups[0]['weight_decay']} | backbone {params:.1f}M params, D={D} | "
           f"probe classes {data.num_classes} | val {'yes' if data.val_loader is not None else 'no'} | "
           f"start step {start}")
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)


class Logger:
    """Rank 0's metrics.jsonl, the record (on resume, lines logged after the checkpoint are dropped), mirrored
    to TensorBoard (--tensorboard true) and Weights & Biases (--wandb PROJECT)."""

    def __init__(self, cfg: Config, start_step: int):
        path = os.path.join(cfg.out_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= start_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        self.file, self.tensorboard, self.wandb = open(path, "a"), None, None
        self.clock = (time.perf_counter(), start_step)  # for images_per_s
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            board = os.path.join(cfg.out_dir, "tensorboard")
            self.tensorboard = SummaryWriter(board, purge_step=start_step + 1)
        if cfg.wandb:
            import wandb
            id_path = os.path.join(cfg.out_dir, "wandb_id")  # the same wandb run across resumes
            run_id = open(id_path).read().strip() if os.path.exists(id_path) else secrets.token_hex(4)
            with open(id_path, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(project=cfg.wandb, id=run_id, resume="allow", dir=cfg.out_dir,
                                    name=os.path.basename(os.path.abspath(cfg.out_dir)),
                                    config=dataclasses.asdict(cfg))

    def images_per_s(self, step: int, batch_size: int) -> float:
        """Since the last call (or the start)."""
        now, (then, then_step) = time.perf_counter(), self.clock
        self.clock = (now, step)
        return batch_size * (step - then_step) / (now - then)

    def __call__(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("step", "epoch")}
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


# --- Export: the backbone alone, in timm's Hugging Face format, loadable in one line.

def export_for_hub(backbone: nn.Module, cfg: dict, step: int, folder: str, probe_acc=None):
    """timm's save_for_hf: config.json (architecture, model args, and the pretrained config: input size,
    bicubic resize + 0.875 centre crop, mean and std) and model.safetensors, plus a model card.
    timm.create_model("local-dir:FOLDER", pretrained=True) loads it; `hf upload USER/REPO FOLDER` publishes
    it."""
    size = cfg["global_size"]
    backbone.pretrained_cfg = dict(backbone.pretrained_cfg, tag="lejepa", input_size=(3, size, size),
                                   num_classes=0, interpolation="bicubic", crop_pct=0.875, crop_mode="center",
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD)  # as eval_transform and normalize
    args = dict(num_classes=0)
    if getattr(backbone, "dynamic_img_size", False):  # ViTs: one model for every view size
        args.update(img_size=size, dynamic_img_size=True)
    os.makedirs(folder, exist_ok=True)
    backbone.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
    timm.models.save_for_hf(backbone, folder, model_args=args, safe_serialization=True)
    acc = "not measured (run linear_probe.py)"
    if probe_acc is not None:
        acc = f"{100 * probe_acc:.2f}% (online linear probe, {cfg['val_split']} split)"
    views = f"{cfg['n_global']} x {cfg['global_size']} px + {cfg['n_local']} x {cfg['local_size']} px views"
    card = f"""# LeJEPA {cfg['model']}

Self-supervised backbone pretrained with LeJEPA (Balestriero & LeCun, arXiv 2511.08544): invariance
+ SIGReg, no teacher, no stop-gradient. Weights only: no classifier head (num_classes=0).

- data: {cfg['dataset']} ({cfg['train_split']} split)
- recipe: {step} steps, {cfg['epochs']} epochs, global batch {cfg['batch_size']}, lr {cfg['lr']}, lambda \
{cfg['lamb']}, {views}, {cfg['num_slices']} slices, projector {cfg['proj_hidden']}-{cfg['proj_dim']}
- top-1: {acc}

```python
import timm
model = timm.create_model("local-dir:{folder}", pretrained=True)  # or "hf-hub:USER/REPO"
cfg = timm.data.resolve_data_config({{}}, model=model)  # the resize, crop and normalisation of training
```
"""
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)
    print0(f"exported {folder}: timm.create_model('local-dir:{folder}', pretrained=True); publish with "
           f"`hf upload USER/REPO {folder}`")


def export_checkpoint(path: str):
    """--export: the export folder of any ckpt.pt, written beside it."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    backbone = build_backbone(ckpt["config"]["model"], ckpt["config"]["global_size"])
    backbone.load_state_dict(ckpt["backbone"])
    export_for_hub(backbone, ckpt["config"], ckpt["step"], os.path.join(os.path.dirname(path), "export"))


if __name__ == "__main__":
    run(main, parse_config())
