"""LeJEPA pretraining of any timm backbone on a Hugging Face image dataset (default: ViT-L/14 on ImageNet-1k).

LeJEPA (Balestriero & LeCun, arXiv 2511.08544): no teacher, no stop-gradient, no predictor. Each image gives
2 global + 6 local views; the loss pulls every view's projection towards the mean of the global views'
(invariance) and pushes the projections towards an isotropic Gaussian (SIGReg, sigreg.py):

    loss = (1 - lambda) * invariance + lambda * SIGReg,      lambda = 0.05

Reading order: Config | 1. views | 2. model | 3. loss | 4. optimiser, schedule | 5. training step | 6. main,
and what its loop calls; the colour ops (torchvision's math); the plumbing. Measured: README (H100, CPU).

    python minimal_vit_inet.py --model vit_small_patch16_224 --local_size 96  # one GPU, or the CPU
    torchrun --nproc_per_node=8 minimal_vit_inet.py  # one node: the official recipe (batch 512 = 8 x 64)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=lejepa minimal_vit_inet.py  # two nodes, through torchrun's rendezvous (run on each)
    python minimal_vit_inet.py --dataset ~/data/imagenette --model resnet18  # a folder of images or parquet
Rerun the same command to resume. ImageNet-1k (timm/imagenet-1k-wds) is gated: accept its terms, log in.
"""
import argparse
import ctypes
import dataclasses
import datetime
import fcntl
import functools
import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import datasets
import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms as T
from torchvision.ops import MLP
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from sigreg import SIGReg

load_builder = functools.cache(datasets.load_dataset_builder)  # once a run: each call globs every file


@dataclasses.dataclass
class Config:  # every field is a flag: --field value (bools: true / false)
    dataset: str = "timm/imagenet-1k-wds"  # hub id, local image folder (imagefolder) or save_to_disk folder
    train_split: str = "train"
    val_split: str = "validation"  # labelled split for the online probe ("" or missing = no evaluation)
    image_column: str = ""  # "" = auto (Image feature, else image/img/jpg)
    label_column: str = ""  # "" = auto (ClassLabel, else label/cls/fine_label); labels only feed the probe
    steps_per_epoch: int = 0  # 0 = dataset size // global batch
    workers: int = 10  # DataLoader workers per rank: JPEG decoding, crops and flips happen there
    # views (official README table; paper ablation: 2 global + 6 local views is the sweet spot)
    n_global: int = 2  # global views; the invariance targets are their mean
    n_local: int = 6
    global_size: int = 224  # px
    local_size: int = 98  # px (14 divides both 224 and 98: one ViT-L/14 serves both)
    global_scale: tuple[float, float] = (0.3, 1.0)  # RandomResizedCrop area fraction
    local_scale: tuple[float, float] = (0.05, 0.3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # ColorJitter: brightness, contrast, ...
    model: str = "vit_large_patch14_224"  # any timm name (ViT, ConvNeXt, ResNet, ...), trained from scratch
    model_kwargs: dict = None  # more timm.create_model arguments, JSON: {"output_stride": 16} (small images)
    drop_path: float = 0.0  # stochastic depth; > 0 makes resume not bit-exact (its RNG is not saved)
    proj_hidden: int = 2048  # projector MLP width (BatchNorm + ReLU after each hidden layer)
    proj_dim: int = 128  # projector output: where invariance and SIGReg are measured
    compile: bool = False  # torch.compile the backbone and the colour stage
    lamb: float = 0.05  # lambda: weight of SIGReg in (1 - lambda) * invariance + lambda * SIGReg
    num_slices: int = 1024  # SIGReg's random directions per step (paper: 1024)
    # optimisation (official README: AdamW, lr 5e-4, wd 5e-2 ViT / 5e-4 ResNet, warm-up + cosine to lr/1000)
    epochs: int = 100
    batch_size: int = 512  # GLOBAL images per step, split over ranks (paper ablation: 512 is best)
    lr: float = 5e-4  # peak learning rate, not scaled with the batch
    weight_decay: float = -1.0  # < 0 = auto: 5e-2 for ViTs, 5e-4 for convnets
    warmup_epochs: float = -1.0  # linear; < 0: parse_config sets 10 (DINO's; paper: none), <= epochs / 10
    final_lr_div: float = 1000.0  # the cosine ends at lr / final_lr_div at the very last step
    probe_lr: float = 1e-3  # online probe (same schedule shape)
    probe_weight_decay: float = 1e-6
    bf16: bool = torch.cuda.is_available()  # bf16 autocast (no GradScaler: that is for fp16)
    seed: int = 0
    out_dir: str = "out/lejepa"  # ckpt.pt, metrics.jsonl, export/ (the backbone for timm); a rerun resumes
    log_every: int = 10  # steps between metric lines (the only host syncs of training)
    save_every: int = 1000  # steps between checkpoints (also at every epoch end)
    stop_after: int = 0  # > 0: checkpoint and exit after this many steps (time-limited jobs)
    wandb: str = ""  # also log to this Weights & Biases project (pip install wandb)


# ---- 1. Views (official README table): RandomResizedCrop, flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8,
# grayscale 0.2, Gaussian blur 0.5, solarize 0.2; workers crop and draw, the device does the colours ----

class MultiCrop:
    """mc(img) -> [(pixels uint8 (3, S, S), colour draws (11,))] for cfg's n_global, then n_local views, drawn
    from torch's global RNG with torchvision's samplers (ViewsDataset seeds it for each image)."""

    def __init__(self, cfg: Config):
        self.jitter = cfg.jitter
        self.kinds = [(cfg.global_size, cfg.global_scale)] * cfg.n_global  # (size, crop scale) of each view
        self.kinds += [(cfg.local_size, cfg.local_scale)] * cfg.n_local

    def __call__(self, img: Image.Image) -> list:
        img = img if img.mode == "RGB" else img.convert("RGB")
        draws = [self.params(*img.size, size, scale) for size, scale in self.kinds]
        return [(self.view(img, p), p["colour"]) for p in draws]

    def params(self, width, height, size, scale) -> dict:
        """One view's draws. colour, the 11 values colour_augment unpacks: the 4 jitter ops' ids in their
        drawn order (-1 x 4: no jitter), the brightness, contrast, saturation and hue factors, grayscale 0|1,
        blur sigma (0: no blur), solarize 0|1."""
        shape = torch.empty(1, 1, 1).expand(3, height, width)  # get_params reads only the image's shape
        top, left, h, w = T.RandomResizedCrop.get_params(shape, scale, ratio=(3 / 4, 4 / 3))
        *bcs, hue = self.jitter  # torchvision's ranges: 1 -+ strength (>= 0), the hue -+ its strength
        order, *factors = T.ColorJitter.get_params(*[(max(0, 1 - x), 1 + x) for x in bcs], (-hue, hue))
        sigma = T.GaussianBlur.get_params(0.1, 2.0)
        flip, jitter, gray, blur, solarize = torch.rand(5).tolist()
        order = order.tolist() if jitter < 0.8 else [-1] * 4
        colour = order + factors + [gray < 0.2, sigma if blur < 0.5 else 0.0, solarize < 0.2]
        return dict(size=size, box=(left, top, left + w, top + h), flip=flip < 0.5,
                    colour=torch.tensor(colour, dtype=torch.float32))

    def view(self, img, p) -> torch.Tensor:
        img = img.resize((p["size"], p["size"]), Image.BILINEAR, box=p["box"])  # crop + resize in one pass
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if p["flip"] else img
        return TF.pil_to_tensor(img)  # uint8: a quarter of float32's bytes through the queues and PCIe


def colour_augment(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """uint8 views (N, 3, H, W), draws (N, 11) -> float32, augmented as torchvision image by image (its ops
    follow main), normalised. Every op runs on all images; torch.where keeps it where drawn: no host sync."""
    x = x / 255  # uint8 -> float32 in [0, 1]
    *order, brightness, contrast, saturation, hue, gray, sigma, solarize = colour.T.reshape(11, -1, 1, 1, 1)
    jitter = [(adjust_brightness, brightness), (adjust_contrast, contrast), (adjust_saturation, saturation),
              (adjust_hue, hue)]
    for slot_op in order:  # ColorJitter's random order: each slot's op, 0 to 3 as in `jitter` (-1: no jitter)
        for op, (adjust, factor) in enumerate(jitter):
            x = torch.where(slot_op == op, adjust(x, factor), x)
    x = torch.where(gray > 0, grayscale(x), x)
    # the images that draw no blur stay exact whatever the convolution's precision (cuDNN may use TF32)
    x = torch.where(sigma > 0, gaussian_blur(x, sigma.flatten()), x)
    x = torch.where((solarize > 0) & (x >= 128 / 255), 1 - x, x)  # solarize at 128 of 255
    return normalize(x, scale=1.0)  # ImageNet's mean and std


# ---- 2. Model: timm backbone -> embedding (the probe reads it) -> projector (the loss reads it) ----

def build_backbone(name: str, img_size: int = 224, drop_path: float = 0.0, **timm_args) -> nn.Module:
    """A timm model from scratch, no classifier: model(x) is the (B, D) embedding; ViTs take any view size."""
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path, **timm_args)
    try:
        return timm.create_model(name, img_size=img_size, dynamic_img_size=True, **kwargs)
    except TypeError:  # a convnet: no img_size argument, and any size works anyway
        return timm.create_model(name, **kwargs)


class LeJEPA(nn.Module):
    """Backbone + projector, and the online probe on the detached embedding: one module, so DDP syncs all."""

    def __init__(self, backbone, proj_hidden, proj_dim, num_classes=0):
        super().__init__()
        self.backbone, D = backbone, backbone.num_features
        # BatchNorm keeps the start away from the all-zero point, where SIGReg's gradient vanishes
        self.projector = MLP(D, [proj_hidden, proj_hidden, proj_dim], norm_layer=nn.BatchNorm1d)
        self.probe = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, num_classes)) if num_classes else None

    def forward(self, groups: list, N: int, n_global: int):
        """groups: the views of each size (V_s * N, 3, S, S), view-major, globals first -> proj (V, N, P), and
        the probe's logits (n_global * N, C) or None: the probe learns from the global views."""
        # eval mode reads BatchNorm's running statistics: the global views' alone; local views update a copy
        spare = {name: b.clone() for name, b in self.backbone.named_buffers()}  # (small crops: other stats)
        local = [torch.func.functional_call(self.backbone, spare, x) for x in groups[1:]]
        emb = torch.cat([self.backbone(groups[0])] + local)  # (V * N, D): one backbone call per view size
        logits = self.probe(emb[:n_global * N].detach()) if self.probe is not None else None
        return self.projector(emb).unflatten(0, (-1, N)), logits


# ---- 3. Loss: invariance to the global views' mean + SIGReg on every view ----

def lejepa_loss(proj: torch.Tensor, n_global: int, sigreg: nn.Module, lamb: float):
    """proj (V, N, P), globals first -> (loss, invariance, sigreg). Invariance: the mean of (z_vn - c_n)^2,
    c_n the mean of image n's global views, over every view (globals too); SIGReg per view, then averaged."""
    proj = proj.float()  # bf16 under autocast: the loss is taken in fp32
    centers = proj[:n_global].mean(0)  # (N, P)
    invariance = (proj - centers).square().mean()
    sig = sigreg(proj)  # (V, N, P) -> a scalar, fp32 inside, all-reduced over ranks: every rank calls it
    return (1 - lamb) * invariance + lamb * sig, invariance, sig


# ---- 4. Optimiser and schedule: AdamW; linear warm-up, then cosine down to lr / final_lr_div ----

def lr_at(step: int, total: int, warmup: int, lr: float, final_div: float = 1000.0) -> float:
    """The learning rate of step `step` in [0, total): warm-up up to lr, then down to lr / final_div."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return lr / final_div + (lr - lr / final_div) * 0.5 * (1 + math.cos(math.pi * progress))


def build_training(cfg: Config, num_classes: int, device: torch.device):
    """-> (model, SIGReg, AdamW); each parameter group holds its peak_lr for the schedule."""
    torch.manual_seed(cfg.seed)  # initial weights given by --seed (DDP then copies rank 0's to the others)
    backbone = build_backbone(cfg.model, cfg.global_size, cfg.drop_path, **(cfg.model_kwargs or {}))
    model = LeJEPA(backbone, cfg.proj_hidden, cfg.proj_dim, num_classes)
    # channels_last: convolutions 1.3x faster on the CPU (resnet18), and PyTorch's advice on GPUs
    model = model.to(device, memory_format=torch.channels_last)
    if cfg.compile:
        backbone.compile()  # in place: the state_dict keys stay those of the plain timm model
    sigreg = SIGReg(num_slices=cfg.num_slices, seed=cfg.seed).to(device)
    wd = cfg.weight_decay if cfg.weight_decay >= 0 else 5e-2 if hasattr(backbone, "patch_embed") else 5e-4
    net = [p for name, p in model.named_parameters() if not name.startswith("probe.")]
    groups = [dict(params=[p for p in net if p.ndim >= 2], weight_decay=wd, peak_lr=cfg.lr),
              dict(params=[p for p in net if p.ndim < 2], weight_decay=0.0, peak_lr=cfg.lr)]  # biases, norms
    if model.probe is not None:  # the probe has its own lr and decay
        groups.append(dict(params=list(model.probe.parameters()), weight_decay=cfg.probe_weight_decay,
                           peak_lr=cfg.probe_lr))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)  # fused: one kernel, no host sync
    return model, sigreg, optimizer


# ---- 5. Training step: views -> embeddings -> loss -> AdamW, with no host sync ----

def train_step(model, optimizer, sigreg, batch, cfg, autocast, device) -> torch.Tensor:
    """One batch of N images from train_batches (collate_views made it in the DataLoader workers):
        batch = ([(views, draws) for each view size S], labels (N,))  # S = 224 px (the globals), then 98 px
        views  uint8 (V_s * N, 3, S, S)  V_s views of size S, view-major: row v * N + n is view v of image n
        draws  float (V_s * N, 11)       their colour draws (MultiCrop.params), read by colour_augment
    Copies are non-blocking (pinned memory), nothing read back -> (loss, invariance, sigreg, probe loss)."""
    groups, labels = batch
    augment = compiled(colour_augment) if cfg.compile else colour_augment
    xs = [augment(x.to(device, non_blocking=True), c.to(device, non_blocking=True))
          .contiguous(memory_format=torch.channels_last) for x, c in groups]  # float (V_s * N, 3, S, S)
    labels = labels.to(device, non_blocking=True)
    with autocast:
        proj, logits = model(xs, len(labels), cfg.n_global)  # (V, N, P), (G * N, C)
        loss, inv, sig = lejepa_loss(proj, cfg.n_global, sigreg, cfg.lamb)
        probe_loss = torch.zeros((), device=device)
        if logits is not None:  # its input is detached: the probe never shapes the backbone
            probe_loss = F.cross_entropy(logits.float(), labels.repeat(cfg.n_global))  # view-major, as logits
    optimizer.zero_grad(set_to_none=True)
    (loss + probe_loss).backward()
    optimizer.step()
    return torch.stack([loss, inv, sig, probe_loss]).detach()


# ---- 6. main: set up; a loop that trains a step, then does what is due; then the functions it calls ----

def main(cfg: Config):
    ddp, rank, world, device = setup_distributed()
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())  # preemption: checkpoint at the next log step, exit
    resume = claim_out_dir(cfg, rank, world)  # the step of the checkpoint in out_dir, 0 = none
    data = load_data(cfg, rank, world)
    model, sigreg, optimizer = build_training(cfg, data.num_classes, device)
    seed_rank(cfg.seed, rank)  # from here each rank draws its own (stochastic depth)
    start = load_checkpoint(cfg, model, optimizer, sigreg) if resume else 0
    train_model = nn.parallel.DistributedDataParallel(model) if ddp else model  # on the current device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    total, warmup = cfg.epochs * data.steps_per_epoch, round(cfg.warmup_epochs * data.steps_per_epoch)
    print_setup(cfg, data, model, optimizer, world, device, total, warmup, start)
    log = Logger(cfg, start) if rank == 0 else None
    bar = tqdm(total=total, initial=start, disable=rank != 0 or not sys.stdout.isatty(), file=sys.stdout)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss: kept on the device
    step, stop, acc = start, "", None  # steps done; why the run stops early; the online probe's last top-1
    # the loop ends at `total` (export), or after a log step that saw SIGTERM or --stop_after (checkpoint,
    # exit 0: resume later); a non-finite loss or weight ends all ranks, check_health below (exit 1, no save)
    while step < total and not stop:
        epoch, offset = divmod(step, data.steps_per_epoch)
        if step == start or offset == 0:  # a resume mid-epoch, or a new epoch
            batches = train_batches(cfg, data.views, epoch, offset, rank, world, data.steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, warmup, group["peak_lr"], cfg.final_lr_div)
        terms = train_step(train_model, optimizer, sigreg, next(batches), cfg, autocast, device)
        nonfinite |= ~torch.isfinite(terms).all()  # no host sync: check_health ends the run at a log or save
        bar.update(1)
        step += 1
        if step % cfg.log_every == 0 or step == start + 1 or step == cfg.stop_after:
            stop = log_step(cfg, step, epoch, terms, optimizer, nonfinite, bar, log)  # "": go on, else save
        if step % data.steps_per_epoch == 0 and data.val_loader is not None:  # an epoch ended: the probe
            acc = evaluate_probe(model, data.val_loader, device, autocast, step, epoch, log)
        if step % data.steps_per_epoch == 0 or step % cfg.save_every == 0 or stop:
            save_checkpoint(cfg, model, optimizer, sigreg, step, nonfinite)
        if step == total and log:  # the end of the run: the backbone in timm's Hugging Face format
            export_for_hub(model.backbone, cfg, total, os.path.join(cfg.out_dir, "export"), acc)
    bar.close()
    if step < total:
        print0(f"stopped after step {step} ({stop}); resume with the same command")
    if log:
        log.close()
    close_distributed()


def evaluate_probe(model, loader, device, autocast, step=0, epoch=0, log=None) -> float:
    """Top-1 of the online probe on the validation split, all ranks' shares together; printed and logged."""
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
    acc = (counts[0] / counts[1].clamp(min=1)).item()
    print0(f"epoch {epoch} done | step {step} | probe top-1 {acc:.4f}")
    if log:
        log(dict(step=step, epoch=epoch, probe_acc=acc))
    return acc


def log_step(cfg, step, epoch, terms, optimizer, nonfinite, bar, log) -> str:
    """The log interval, on every rank: the one host sync of training. -> why the run stops after this step:
    "SIGTERM" (on any rank), "--stop_after", or "" to go on."""
    sigterm = check_health(cfg, nonfinite, step)
    if log:
        loss, inv, sig, probe_loss = terms.tolist()
        lr, (then, then_step) = optimizer.param_groups[0]["lr"], log.clock  # since the last log line
        log.clock = (time.perf_counter(), step)
        images_per_s = cfg.batch_size * (step - then_step) / (log.clock[0] - then)
        bar.set_postfix(loss=f"{loss:.4f}", inv=f"{inv:.4f}", sigreg=f"{sig:.3f}", lr=f"{lr:.2e}",
                        img_s=f"{images_per_s:.0f}")
        if bar.disable:  # stdout is not a terminal: this line, not a bar redrawn several times a second
            print0(f"step {step}/{bar.total} | {bar.postfix}")
        log(dict(step=step, epoch=epoch, loss=loss, invariance=inv, sigreg=sig, probe_loss=probe_loss, lr=lr,
                 images_per_s=images_per_s))
    return "SIGTERM" if sigterm else "--stop_after" if step == cfg.stop_after else ""


def check_health(cfg, nonfinite, step, model=None) -> bool:
    """The one host sync of training (log steps, saves), all-reduced: every rank ends alike, in one line, if
    any saw a non-finite loss or (given the model) weight, as a NaN gradient makes. True: a SIGTERM came."""
    flags = [nonfinite, torch.full_like(nonfinite, STOP.is_set())]  # full, not tensor(): no host copy
    if model is not None:
        flags.append(~torch.stack([p.isfinite().all() for p in model.parameters()]).all())
    flags = torch.stack(flags).float()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad_loss, stop, *bad_weights = flags.tolist()
    if bad_loss or any(bad_weights):
        sys.exit(f"error: non-finite {'loss' if bad_loss else 'weights'} by step {step}; stopped, "
                 f"{last_checkpoint(cfg)}")
    return bool(stop)


def save_checkpoint(cfg, model, optimizer, sigreg, step, nonfinite):
    """out_dir/ckpt.pt by rank 0, once all is finite; a failed write (full disk) ends every rank alike."""
    check_health(cfg, nonfinite, step, model)
    error = [None]
    if int(os.environ.get("RANK", 0)) == 0:
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), sigreg=sigreg.state_dict(),
                     step=step, config=dataclasses.asdict(cfg))
        try:
            write_atomic(state, os.path.join(cfg.out_dir, "ckpt.pt"))
        except SystemExit as err:
            error = [f"{err.code}; {last_checkpoint(cfg)}"]
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)  # the other ranks wait here for the outcome
    if error[0]:
        sys.exit(error[0])


def train_batches(cfg, views, epoch, skip, rank, world, steps_per_epoch):
    """One epoch's batches on this rank, after the first `skip` (a resume mid-epoch: those are not read)."""
    per_rank = cfg.batch_size // world
    sampler = DistributedSampler(views.ds, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)  # a new permutation each epoch, the same on all ranks
    order = list(sampler)[skip * per_rank: steps_per_epoch * per_rank]
    yield from DataLoader(views, per_rank, sampler=[(epoch, i) for i in order], num_workers=cfg.workers,
                          collate_fn=collate_views, pin_memory=torch.cuda.is_available(), drop_last=True,
                          worker_init_fn=_worker_init)


class ViewsDataset(torch.utils.data.Dataset):
    """Item (epoch, index) -> (views, label), seeded by (seed, epoch, index): alike for any worker count,
    world size or resume point. A file that cannot be decoded gives way to the next readable one."""

    def __init__(self, ds, image_col, label_col, transform, seed):
        self.ds, self.image_col, self.label_col, self.transform = ds, image_col, label_col, transform
        self.seed = seed

    def __getitem__(self, key):
        epoch, i = key
        for j in range(i, i + 100):
            j %= len(self.ds)
            try:
                row = self.ds[j]  # decodes the image, in a worker
                seed = int(np.random.SeedSequence([self.seed, epoch, j]).generate_state(1)[0])
                with torch.random.fork_rng(devices=[]):  # --workers 0: the main process's own draws go on
                    torch.default_generator.manual_seed(seed)  # the CPU RNG, which MultiCrop draws from
                    views = self.transform(row[self.image_col])
                return views, (row[self.label_col] if self.label_col else -1)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL: a bad file
                sys.stderr.write(f"warning: skipped unreadable image #{j}: {err!r}\n")
        raise RuntimeError(f"100 unreadable images from #{i}: is --image_column {self.image_col!r} right?")


def collate_views(items):
    """In the worker: [(views, label)] * N -> the batch train_step reads (its docstring shows the layout)."""
    views, labels = zip(*items)
    groups = {}  # view size -> [(pixels, colour)], view-major: the v-th view of every image, then the next
    for same_view in zip(*views):
        groups.setdefault(same_view[0][0].shape, []).extend(same_view)
    stacked = [(torch.stack([p for p, _ in g]), torch.stack([c for _, c in g])) for g in groups.values()]
    return stacked, torch.tensor(labels)


# ---- colour_augment's ops (1. views), torchvision's math: x (N, 3, H, W) in [0, 1], factor (N, 1, 1, 1) ----
def adjust_brightness(x, factor):  # blend with black
    return (x * factor).clamp(0, 1)


def adjust_contrast(x, factor):  # blend with the mean grey: lerp(mean, x, f) = f x + (1 - f) mean
    return torch.lerp(grayscale(x).mean((1, 2, 3), keepdim=True), x, factor).clamp(0, 1)


def adjust_saturation(x, factor):  # blend with the grey image
    return torch.lerp(grayscale(x), x, factor).clamp(0, 1)


def adjust_hue(x, shift):
    """torchvision's adjust_hue (RGB -> HSV, the hue turned by `shift` turns, HSV -> RGB) in closed form. With
    v = max, delta = max - min (= v s) and the hue h in sixths of a turn (0 red, 2 green, 4 blue),
        RGB -> HSV: h = (g - b) / delta if r is the max, (b - r) / delta + 2 if g, (r - g) / delta + 4 if b;
        turn:       h = h + 6 shift;
        HSV -> RGB: channel n (r: 5, g: 3, b: 1) = v - delta clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6.
    A grey pixel (delta 0) has no hue and stays as it is (the clamp is multiplied by 0)."""
    v, top = x.max(1, keepdim=True)  # (N, 1, H, W): the max and its channel (tied channels give the same h)
    delta = v - x.amin(1, keepdim=True)
    diff = x.roll(-1, 1) - x.roll(-2, 1)  # (g - b, b - r, r - g): h's numerator for a max in r, g, b
    h = (diff / delta.clamp(min=1e-12) + channel_constant((0.0, 2, 4), x.device)).gather(1, top)
    k = (h + 6 * shift + channel_constant((5.0, 3, 1), x.device)) % 6  # (N, 3, H, W)
    return v - delta * torch.minimum(k, 4 - k).clamp(0, 1)


def grayscale(x):  # (N, 3, H, W) -> (N, 1, H, W), ITU-R 601-2 luma as torchvision
    return (x * channel_constant((0.2989, 0.587, 0.114), x.device)).sum(1, keepdim=True)


def gaussian_blur(x, sigma, size=23):
    """Per-image Gaussian blur with reflect padding, `size` taps as the official recipe's GaussianBlur (fewer
    when the view is smaller); sigma 0 gives a delta kernel: the image as is. x (N, C, H, W), sigma (N,)."""
    N, C, H, W = x.shape
    half = min(size // 2, H - 1, W - 1)  # reflect padding needs half < the side
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma.clamp(min=1e-3)[:, None]) ** 2)  # sigma 1e-3: exactly (..., 0, 1, 0, ...)
    k = (k / k.sum(1, keepdim=True)).repeat(1, C).view(N * C, 1, 1, -1)  # a kernel per image and channel
    x = F.pad(x.reshape(1, N * C, H, W), (half,) * 4, mode="reflect")
    x = F.conv2d(x, k, groups=N * C)  # separable: rows, then columns
    return F.conv2d(x, k.view(N * C, 1, -1, 1), groups=N * C).view(N, C, H, W)


# ==== Plumbing: the command line, processes and faults, data, checkpoints, logs, export ====

def parse_config(argv=None) -> Config:
    """argparse generated from the dataclass; every check that can fail before heavy work ends in one line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):  # a mistyped bool is refused; in strings, ~ is home, as in a shell
        n = len(f.default) if isinstance(f.default, tuple) else None  # crop scales: 2 numbers, jitter: 4
        parse = {bool: flag, str: os.path.expanduser, dict: json.loads}.get(f.type, float if n else f.type)
        p.add_argument(f"--{f.name}", type=parse, nargs=n, default=f.default)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()})
    positive = ["batch_size", "global_size", "local_size", "n_global", "num_slices", "proj_hidden",
                "proj_dim", "epochs", "lr", "log_every", "save_every", "final_lr_div"]
    not_negative = ["workers", "steps_per_epoch", "stop_after", "n_local", "drop_path"]
    checks = [(getattr(cfg, k) > 0, f"--{k} must be > 0, got {getattr(cfg, k)}") for k in positive]
    checks += [(getattr(cfg, k) >= 0, f"--{k} must be >= 0, got {getattr(cfg, k)}") for k in not_negative]
    local = cfg.dataset.startswith(("/", ".")) or cfg.dataset.count("/") > 1  # a path, not owner/name
    checks += [
        (0 <= cfg.lamb <= 1, f"--lamb must be in [0, 1], got {cfg.lamb}"),
        (cfg.drop_path < 1, f"--drop_path must be < 1, got {cfg.drop_path}"),
        (all(0 < a <= b <= 1 for a, b in (cfg.global_scale, cfg.local_scale)),
         "crop scales need 0 < min <= max <= 1"),
        (min(cfg.jitter) >= 0 and cfg.jitter[3] <= 0.5, "--jitter strengths must be >= 0, the hue's <= 0.5"),
        (cfg.warmup_epochs < cfg.epochs, f"--warmup_epochs {cfg.warmup_epochs} is not shorter than --epochs "
                                         f"{cfg.epochs}: the learning rate would never reach its peak"),
        (timm.is_model(cfg.model), f"unknown timm model {cfg.model!r}; see timm.list_models('*vit*')"),
        (not cfg.wandb or importlib.util.find_spec("wandb"), "--wandb needs: pip install wandb"),
        (not local or os.path.isdir(cfg.dataset), f"--dataset {cfg.dataset}: no such folder")]
    for ok, msg in checks:
        if not ok:
            sys.exit(f"error: {msg}")
    patch = patch_size(cfg.model, cfg.model_kwargs or {})
    if cfg.global_size % patch or cfg.n_local and cfg.local_size % patch:  # no local views: no local size
        glob, loc = [round(s / patch) * patch for s in (cfg.global_size, cfg.local_size)]  # nearest multiples
        sys.exit(f"error: {cfg.model} cuts images into {patch} px patches: --global_size {cfg.global_size} "
                 f"and --local_size {cfg.local_size} must be multiples of {patch}, e.g. {glob} and {loc}")
    if cfg.warmup_epochs < 0:  # auto: 10 epochs, at most a tenth of the run
        cfg.warmup_epochs = min(10.0, cfg.epochs / 10)
    return cfg


def flag(text: str) -> bool:  # --field true / false; a typo is refused, not read as false
    return bool(["false", "true", "0", "1", "no", "yes"].index(text.lower()) % 2)  # not in it: ValueError


def patch_size(model: str, timm_args: dict) -> int:
    """A ViT's patch size in px (1: a convnet, or unknown), built on the meta device: no memory, 0.1 s."""
    try:
        with torch.device("meta"):
            size = getattr(getattr(build_backbone(model, **timm_args), "patch_embed", None), "patch_size", 1)
    except TypeError as err:  # an argument the model does not take, or --model_kwargs not a JSON object
        sys.exit(f"error: {model} with --model_kwargs {json.dumps(timm_args)}: {err}")
    except Exception:  # not buildable on the meta device: the run itself will say what timm thinks
        return 1
    return size[0] if isinstance(size, (tuple, list)) else int(size)


# --- Processes and faults: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (plain `python`: one process); a run
# ends at once on any error, keeps one writer per out_dir, and checkpoints on SIGTERM.

STOP = threading.Event()  # set by SIGTERM (preemption): the loop checkpoints and exits
# settings a resumed run may change; any other difference means out_dir holds another run's checkpoint
RESUMABLE = {"workers", "log_every", "save_every", "stop_after", "compile", "out_dir", "bf16", "wandb"}


def setup_distributed():
    ddp, rank, world, local_rank = "RANK" in os.environ, 0, 1, 0
    if ddp:
        rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        # ranks may wait an hour (NCCL's default: 10 min) for a slow one: a checkpoint, a node preparing data
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=60))
        threading.Thread(target=exit_with_launcher, args=(os.getppid(),), daemon=True).start()
    return ddp, rank, world, torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def close_distributed():
    if dist.is_initialized():
        time.sleep(0.1)  # lets gloo's threads release their finished work (else a hang, or an abort, at exit)
        dist.destroy_process_group()


def run(main, *args):
    """Call main; on any error end at once, with the traceback or sys.exit's line (os._exit: no exit handlers,
    which would wait forever for DataLoader workers that outlive a SIGTERM); torchrun stops the others."""
    try:
        main(*args)
    except SystemExit as err:  # sys.exit("error: one line"): that line alone
        if isinstance(err.code, str):  # one write (stderr is line-buffered): ranks' lines never interleave
            sys.stderr.write(err.code + "\n")
        os._exit(1 if isinstance(err.code, str) else err.code or 0)
    except BaseException:
        traceback.print_exc()  # stderr is line-buffered: written before os._exit
        os._exit(1)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def exit_with_launcher(launcher: int):
    """End this rank once torchrun is gone (OOM killer, kill -9): ranks run in sessions of their own."""
    while os.getppid() == launcher:  # the rank is re-parented when the launcher dies
        time.sleep(1)
    sys.stderr.write(f"error: rank {os.environ['RANK']}: torchrun (pid {launcher}) is gone; exiting\n")
    os._exit(1)


def claim_out_dir(cfg: Config, rank: int, world: int) -> int:
    """Refuse, touching nothing, a batch that does not split over the ranks, another run's out_dir, or one in
    use (rank 0 then holds the lock on out_dir/lock for the run). -> the checkpoint's step or 0"""
    if cfg.batch_size % world:
        sys.exit(f"error: --batch_size {cfg.batch_size} is not divisible by the world size {world}")
    path, step = os.path.join(cfg.out_dir, "ckpt.pt"), 0
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # mmap: no full read
        except Exception as err:
            sys.exit(f"error: cannot read {path} ({err!r}); move it away to start afresh")
        diff = [f"--{k} {saved['config'].get(k)!r} there, {v!r} here" for k, v in vars(cfg).items()
                if k not in RESUMABLE and saved["config"].get(k) != v]
        if diff:
            sys.exit(f"error: {path} belongs to another run ({'; '.join(diff)}); use another --out_dir, or "
                     f"the same settings to resume it")
        step = saved["step"]
    mine = (lock_out_dir(cfg.out_dir) if rank == 0 else 0, step)  # rank 0: the lock holder's pid, 0 if none
    claims = [mine] * world
    if world > 1:
        dist.all_gather_object(claims, mine)  # every rank learns every claim: all end alike
    holder, steps = claims[0][0], [s for _, s in claims]
    if holder:
        sys.exit(f"error: {cfg.out_dir} is in use by another run (pid {holder} holds {cfg.out_dir}/lock); "
                 f"wait for it to end, stop it, or pass another --out_dir")
    if len(set(steps)) > 1:  # a node that sees another folder would resume elsewhere, or not at all
        sys.exit(f"error: the ranks find checkpoints of steps {steps} in --out_dir {cfg.out_dir}: it must be "
                 f"one folder that every node sees")
    if cfg.stop_after and step >= cfg.stop_after:  # a time-limited job that is done already
        print0(f"nothing to do: the checkpoint is at step {step}, --stop_after {cfg.stop_after}")
        sys.exit(0)
    return step


def lock_out_dir(out_dir: str) -> int:
    """A non-blocking POSIX lock on out_dir/lock, which then holds our pid. -> 0, or the holder's pid. The OS
    drops it when this process dies, and forked DataLoader workers do not inherit it."""
    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(os.path.join(out_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)  # never closed: that unlocks
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
        return int(os.read(fd, 32) or -1)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return 0


def _worker_init(worker_id):
    """A worker serves batches for 60 s after a SIGTERM (its rank reaches its checkpoint) and dies with its
    rank (one blocked on a pipe to a killed rank stayed for hours)."""
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(60))  # SIGALRM's default action ends the worker
    if hasattr(ctypes.CDLL(None), "prctl"):  # Linux; elsewhere DataLoader's own watchdog (a 5 s poll)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG, a signal when the parent dies


def seed_rank(seed: int, rank: int):
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


# --- Data: a split of a hub dataset, an image folder or a save_to_disk folder, served as views.

def load_data(cfg: Config, rank: int, world: int):
    """The training views, the validation loader, the probe's classes and the steps of an epoch. Every rank
    loads: datasets' file locks let one process per node prepare the cache while the others wait."""
    train = load_split(cfg.dataset, cfg.train_split)
    val = load_split(cfg.dataset, cfg.val_split, missing_ok=True) if cfg.val_split else None
    image_col, label_col = find_columns(train, cfg.image_column, cfg.label_column)
    most = len(train) // cfg.batch_size  # an epoch is one pass, no repeats
    steps = cfg.steps_per_epoch or most
    if not 0 < steps <= most:
        sys.exit(f"error: --steps_per_epoch {steps} x --batch_size {cfg.batch_size} needs more than the "
                 f"{len(train)} images of {cfg.dataset}: at most {most}")
    has_val = val is not None and label_col in val.features
    return argparse.Namespace(
        views=ViewsDataset(train, image_col, label_col, MultiCrop(cfg), cfg.seed), steps_per_epoch=steps,
        num_classes=count_classes(train, label_col) if label_col else 0,
        val_loader=eval_loader(cfg, val, image_col, label_col, rank, world) if has_val else None)


def load_split(dataset: str, split: str, missing_ok: bool = False):
    """One split of a save_to_disk folder, another local folder or a hub dataset (the first call prepares it,
    a process per core: ImageNet's 1,024 tars); with missing_ok, None when there is no such split."""
    try:
        if os.path.exists(os.path.join(dataset, "dataset_dict.json")):
            return datasets.load_from_disk(dataset)[split]  # a DatasetDict written by save_to_disk
        if os.path.exists(os.path.join(dataset, "dataset_info.json")):
            ds = datasets.load_from_disk(dataset)  # one saved split: it answers to "train" and its own name
            if split not in ("train", str(ds.split)):
                raise KeyError(split)
            return ds
        builder = load_builder(dataset)  # a folder: its format inferred; a hub id: downloaded once
        builder.download_and_prepare(num_proc=None if os.path.isdir(dataset) else os.cpu_count())
        return builder.as_dataset(split=split)
    except (ValueError, KeyError, ConnectionError, FileNotFoundError) as err:  # incl. DatasetNotFoundError
        if missing_ok and (isinstance(err, KeyError) or "split" in str(err)):  # (KeyError: a saved folder's)
            return None
        sys.exit(f"error: {dataset}: {hub_error(dataset, err)}")


def hub_error(dataset: str, err: Exception) -> str:
    """datasets' error as one line, with the two hints that matter: offline, and gated."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, KeyError):  # a split that a save_to_disk folder lacks
        return f"no split {text}"
    if "gated" in text:
        return f"{text} Accept its terms at https://huggingface.co/datasets/{dataset}, then `hf auth login`"
    if isinstance(err, ConnectionError):
        return (f"cannot reach the Hugging Face hub ({text}); offline, use a local copy: --dataset FOLDER "
                f"(FOLDER/train/<class>/*.jpg, or a save_to_disk folder), or HF_HUB_OFFLINE=1 and its cache")
    return text


def find_columns(ds, image_column: str = "", label_column: str = ""):
    """(image column, label column or None): as given, else an Image / ClassLabel feature, else by name."""
    def find(given, feature, common):
        typed = [k for k, v in ds.features.items() if isinstance(v, feature)]
        return given or next(iter(typed + [k for k in common if k in ds.features]), None)
    image = find(image_column, datasets.Image, ("image", "img", "jpg", "png"))
    if image is None:
        sys.exit(f"error: no image column among {list(ds.features)}; pass --image_column")
    return image, find(label_column, datasets.ClassLabel, ("label", "cls", "fine_label", "labels"))


def count_classes(ds, label_col) -> int:  # a ClassLabel's count, else the highest label + 1
    return getattr(ds.features.get(label_col), "num_classes", 0) or int(max(ds[label_col])) + 1


def eval_transform(img: Image.Image, size: int = 224) -> torch.Tensor:
    """The usual evaluation view, uint8: short side to size / 0.875, centre crop."""
    img = TF.resize(img.convert("RGB"), int(size / 0.875), interpolation=TF.InterpolationMode.BICUBIC)
    return TF.pil_to_tensor(TF.center_crop(img, [size, size]))


def eval_loader(cfg, ds, image_col, label_col, rank, world, batch_size=0):
    """Validation batches (uint8 centre crops, labels); each rank a disjoint share, nothing repeated."""
    data = ViewsDataset(ds, image_col, label_col, functools.partial(eval_transform, size=cfg.global_size), 0)
    return DataLoader(data, batch_size or cfg.batch_size // world, num_workers=cfg.workers,
                      sampler=[(0, i) for i in range(rank, len(ds), world)], worker_init_fn=_worker_init,
                      pin_memory=torch.cuda.is_available())


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalize(x: torch.Tensor, scale: float = 255.0, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W), or floats in [0, 1] with scale=1 -> normalised with mean and std (ImageNet's)."""
    mean, std = channel_constant(tuple(mean), x.device), channel_constant(tuple(std), x.device)
    return (x.float() / scale - mean) / std


@functools.cache
def channel_constant(values: tuple, device: torch.device) -> torch.Tensor:
    """(1, C, 1, 1), built once per device: torch.tensor(..., device=cuda) in a step is a host sync."""
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


@functools.cache
def compiled(fn):  # --compile: fn compiled at its first use, one graph per input shape
    return torch.compile(fn, fullgraph=True, dynamic=False)


# --- Checkpoints: a plain dict (save_checkpoint, after main) written atomically by rank 0; resume reads it.

def write_atomic(obj, path: str):
    """torch.save to path.tmp, then a rename; a failed write (a full disk): path.tmp removed, one line."""
    try:
        with open(path + ".tmp", "wb") as f:  # same folder: os.replace is atomic, a crash never leaves half
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, even if the machine then loses power
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as err:  # torch.save raises RuntimeError; f.write's OSError is its context
        cause = err if isinstance(err, OSError) else err.__context__
        if not isinstance(cause, OSError):
            raise
        Path(path + ".tmp").unlink(missing_ok=True)  # a partial file, on a disk that has no room for it
        sys.exit(f"error: cannot write {path}: {cause.strerror or cause}")


def last_checkpoint(cfg) -> str:  # for an error line: what a rerun resumes from (a save is atomic)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    saved = os.path.exists(path) and torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return f"the last good checkpoint is {path} (step {saved['step']})" if saved else "none saved"


def load_checkpoint(cfg, model: LeJEPA, optimizer, sigreg) -> int:
    ckpt = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    sigreg.load_state_dict(ckpt["sigreg"])  # its step counter: the next step draws the slices it would have
    return ckpt["step"]


# --- Logs: the set-up on stdout; metrics.jsonl (the record), mirrored to Weights & Biases when asked.

def print_setup(cfg, data, model, optimizer, world, device, total, warmup, start):
    params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    probe = f"on {cfg.val_split!r}" if data.val_loader else f"off (--val_split {cfg.val_split!r}: no labels)"
    print0(f"torch {torch.__version__} | timm {timm.__version__} | datasets {datasets.__version__} | "
           f"{world} process(es) on {device.type} | {'bf16' if cfg.bf16 else 'fp32'}")
    print0("config: " + json.dumps(dataclasses.asdict(cfg)))
    print0(f"derived: global batch {cfg.batch_size} ({cfg.batch_size // world}/rank) | views/step "
           f"{(cfg.n_global + cfg.n_local) * cfg.batch_size} | steps/epoch {data.steps_per_epoch} | total "
           f"steps {total} | warm-up {warmup} steps ({cfg.warmup_epochs:g} epochs) | weight decay "
           f"{optimizer.param_groups[0]['weight_decay']} | backbone {params:.1f}M params | online probe "
           f"{probe}, {data.num_classes} classes | start step {start}")


class Logger:
    """Rank 0's metrics.jsonl (a resume drops the lines after its checkpoint), mirrored to W&B by --wandb."""

    def __init__(self, cfg: Config, start_step: int):
        path = os.path.join(cfg.out_dir, "metrics.jsonl")
        lines = open(path).readlines() if os.path.exists(path) else []
        kept = [x for x in lines if x.endswith("\n") and json.loads(x)["step"] <= start_step]
        Path(path + ".tmp").write_text("".join(kept))
        os.replace(path + ".tmp", path)
        self.file, self.wandb, self.clock = open(path, "a"), None, (time.perf_counter(), start_step)
        if cfg.wandb:
            import wandb
            id_path = os.path.join(cfg.out_dir, "wandb_id")
            if os.path.exists(id_path):  # a resume rewinds the W&B run to the checkpoint, as metrics.jsonl is
                run = dict(resume_from=f"{open(id_path).read()}?_step={start_step}")  # W&B drops lower steps
            else:
                run = dict(id=os.urandom(4).hex())
                Path(id_path).write_text(run["id"])
            self.wandb = wandb.init(project=cfg.wandb, dir=cfg.out_dir, config=dataclasses.asdict(cfg), **run)

    def __call__(self, record: dict):
        print(json.dumps(record), file=self.file, flush=True)
        if self.wandb:
            self.wandb.log(record, step=record["step"])

    def close(self):
        self.file.close()
        if self.wandb:
            self.wandb.finish()


# --- Export: the backbone alone, in timm's Hugging Face format, loadable in one line.

def export_for_hub(backbone: nn.Module, cfg: Config, step: int, folder: str, probe_acc=None):
    """timm's save_for_hf: config.json (eval_transform's size, crop, mean and std), model.safetensors; and a
    model card. timm.create_model("local-dir:FOLDER", pretrained=True) loads it; `hf upload` shares it."""
    backbone.pretrained_cfg = dict(backbone.pretrained_cfg, tag="lejepa", num_classes=0, crop_pct=0.875,
                                   input_size=(3, cfg.global_size, cfg.global_size), interpolation="bicubic",
                                   crop_mode="center", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    args = dict(num_classes=0, **(cfg.model_kwargs or {}))  # timm rebuilds the model from these
    if getattr(backbone, "dynamic_img_size", False):  # ViTs: one model for every view size
        args.update(img_size=cfg.global_size, dynamic_img_size=True)
    backbone.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
    timm.models.save_for_hf(backbone, folder, model_args=args, safe_serialization=True)
    acc = f"{100 * probe_acc:.2f}% (online linear probe, {cfg.val_split})" if probe_acc is not None else "-"
    Path(folder, "README.md").write_text(
        f"# LeJEPA {cfg.model}\n\nPretrained with LeJEPA (arXiv 2511.08544) by minimal_vit_inet.py on "
        f"{cfg.dataset}: {step} steps, {cfg.epochs} epochs of batch {cfg.batch_size}, no head; top-1: {acc}."
        f"\n\n```python\nimport timm\nmodel = timm.create_model(\"local-dir:{folder}\", pretrained=True)  "
        f"# or hf-hub:USER/REPO\n```\n")
    print0(f"exported {folder}: timm.create_model('local-dir:{folder}', pretrained=True)")


if __name__ == "__main__":
    run(main, parse_config())
