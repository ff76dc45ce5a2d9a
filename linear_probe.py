r"""Frozen-feature linear probe and k-NN of a LeJEPA backbone (or any timm model): ImageNet-1k top-1, and the
official README's transfer table (1-shot, 10-shot and all-data probes on 8 datasets, with their average).

Sections, in reading order:
  Config                 every flag; TRANSFER, the 8 datasets of the transfer table
  Backbone and features  the official README's "Linear Probe Evaluation", the same for every model
  Extraction and cache   each split once, cached in --out_dir/features: a second run with other head settings
                         (--lr, --epochs, --shots, ...) extracts nothing; under torchrun each rank a share
  Evaluation             k-shot draws, LayerNorm + Linear head, DINO's weighted k-NN, the tables
  main                   every rank extracts, then rank 0 alone trains the heads and reports
  Plumbing               flags, checkpoints, datasets, gathering over ranks, outputs

Commands (every Config field is a flag: --field value; list fields take several values):
  # ImageNet-1k probe of a pretraining run: model and resolution come from its checkpoint
  torchrun --nproc_per_node=8 linear_probe.py --checkpoint out/lejepa/ckpt.pt
  # the transfer table: 1- and 10-shot (mean ± std over 3 draws) and all-data probes, 8 datasets + average
  torchrun --nproc_per_node=8 linear_probe.py --checkpoint out/lejepa/ckpt.pt --dataset transfer \
      --shots 1 10 all
  # the exported backbone, or any other timm model on the same protocol (random init, or timm's weights)
  python linear_probe.py --checkpoint out/lejepa/backbone.pth --model vit_large_patch14_224 --global_size 224
  python linear_probe.py --model resnet50 --pretrained true --dataset cifar10 pets --shots 10 all
  # a local image folder (root/train/<class>/*.jpg, root/test/...) or a save_to_disk folder; raw pixels
  python linear_probe.py --checkpoint out/lejepa/ckpt.pt --dataset /data/cifar10-jpg --val_split test
  python linear_probe.py --model pixels --global_size 32 --dataset /data/cifar10-jpg --val_split test
Outputs in --out_dir: results.json (every number, every draw, timings) and table.md (the tables printed last).
Measured (2-core CPU, shared): CIFAR-10 (50k train / 10k test, resnet18 at 32 px): extraction 4.7 min,
head + k-NN 1 min; a second run (cache) is the head alone. One H100: the same in 26 s (bench/gpu_check.py).
ImageNet and transfer-table times: not measured yet.
ImageNet-1k (timm/imagenet-1k-wds) is gated: accept its terms on the hub and `hf auth login`.
"""
import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import sys
import time

import datasets
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from datasets.distributed import split_dataset_by_node
from timm.data import resolve_model_data_config
from tqdm import tqdm

import minimal_vit_inet as mvi  # data loading, backbone construction, eval transform, distributed setup
from minimal_vit_inet import print0


# ---- Config: every field is a command-line flag (--field value) ----

@dataclasses.dataclass
class Config:
    # backbone
    checkpoint: str = ""  # ckpt.pt of minimal_vit_inet.py (holds model and size), or backbone.pth (+ --model)
    model: str = ""  # timm name ("" = the checkpoint's); "pixels" = the normalised image itself (a baseline)
    pretrained: bool = False  # timm's own weights for --model: another model on the same protocol
    global_size: int = 0  # px, resize + centre crop; 0 = the checkpoint's, timm's for --pretrained, else 224
    # data
    dataset: tuple = ("timm/imagenet-1k-wds",)  # hub ids, folders or TRANSFER names; "transfer" = all 8
    dataset_config: str = ""  # hub config ("" = default); this and the next two: not for TRANSFER names
    dataset_revision: str = ""  # hub revision, e.g. refs/convert/parquet for script-only repos (imagenette)
    dataset_data_dir: str = ""  # hub sub-folder, e.g. 160px for frgfm/imagenette
    train_split: str = "train"  # fits the head (TRANSFER names use their own splits)
    val_split: str = "validation"  # the accuracy is reported on it (image folders often call it "test")
    image_column: str = ""  # "" = auto (Image feature, else image/img/jpg)
    label_column: str = ""  # "" = auto (ClassLabel feature, else label/cls/fine_label)
    streaming: bool = False  # stream hub data instead of downloading it (extraction reads each image once)
    batch_size: int = 256  # images per extraction batch, per rank
    workers: int = 8  # DataLoader workers per rank (JPEG decoding and resizing)
    bf16: bool = torch.cuda.is_available()  # bf16 autocast for extraction; CPU: fp32 unless asked
    # heads, trained on the cached features
    shots: tuple = ("all",)  # training images per class: integers and/or "all"
    draws: int = 3  # k-shot draws, seeds seed..seed+draws-1; tables report mean ± std over them
    epochs: int = 100  # passes over the training features
    min_steps: int = 1000  # a few-shot training set is one batch: the head still takes this many steps
    head_batch: int = 1024  # features per head step
    lr: float = 1e-3  # AdamW peak learning rate of the head
    weight_decay: float = 1e-6  # official README: "very small"
    warmup_frac: float = 0.1  # fraction of the head's steps spent warming up linearly
    knn_k: int = 20  # DINO's k-NN: neighbours that vote; 0 = skip k-NN (reported as nan)
    knn_temperature: float = 0.07  # DINO: vote weight exp(cosine / T)
    seed: int = 0  # random-init weights, k-shot draws, head init and batch order
    out_dir: str = "out/probe"  # features/ cache, results.json, table.md


# short name: (hub id, train split, test split, label column, data_files), from the dataset cards (see shared
# ECOSYSTEM_NOTES). Where a validation split exists the head trains on train+validation.
TRANSFER = {
    "dtd": ("mcimpoi/dtd_split_1", "train+validation", "test", "label", None),  # split 1 of the official 10
    "aircraft": ("Donghyun99/FGVC-Aircraft", "train+val", "test", "variation", None),  # "label": 70 families
    # without data_files the builder prepares all 9 splits (7 corruptions, about 6 GB)
    "cars": ("tanganke/stanford_cars", "train", "test", "label",
             {"train": "data/train-*.parquet", "test": "data/test-*.parquet"}),
    "cifar10": ("uoft-cs/cifar10", "train", "test", "label", None),
    "cifar100": ("uoft-cs/cifar100", "train", "test", "fine_label", None),  # not the 20 coarse labels
    "flowers102": ("dpdl-benchmark/oxford_flowers102", "train+validation", "test", "label", None),
    "food101": ("ethz/food101", "train", "validation", "label", None),  # validation = the official test set
    "pets": ("timm/oxford-iiit-pet", "train", "test", "label", None),  # train = the official trainval
}
HUB = ("hf-hub:", "local-dir:")  # timm's prefixes for Hugging Face format weights (minimal_vit_inet's export)


# ---- Backbone and features (official README, "Linear Probe Evaluation"): frozen, alike for every model ----

def build_model(cfg: Config, device):
    """-> (frozen model on device, in eval mode; evaluation size in px, mean, std, identity for the cache)."""
    mean, std = mvi.IMAGENET_MEAN, mvi.IMAGENET_STD  # what minimal_vit_inet.normalize trains with
    name, size = cfg.model, cfg.global_size or 224
    if os.path.isdir(cfg.checkpoint):  # an export folder of minimal_vit_inet.py (timm's Hugging Face format)
        name = "local-dir:" + os.path.abspath(cfg.checkpoint)
    if name.startswith(HUB) or (cfg.pretrained and not cfg.checkpoint):
        # weights with their pretrained config: its resolution (unless --global_size) and normalisation
        try:  # dynamic_img_size: a ViT also at another --global_size than it was trained at
            model = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True)
        except TypeError:  # a convnet: any size works
            model = timm.create_model(name, pretrained=True, num_classes=0)
        data = resolve_model_data_config(model)
        mean, std, size = data["mean"], data["std"], cfg.global_size or data["input_size"][-1]
        weights = model.pretrained_cfg  # which weights: hub repo and tag (a new default tag: new features)
        ident = f"timm:{name}:pretrained:{weights.get('hf_hub_id')}:{weights.get('tag')}"
        if name.startswith("local-dir:"):  # a new export in the same folder must not reuse old features
            files = [os.path.join(name[len("local-dir:"):], f) for f in ("config.json", "model.safetensors")]
            ident += str([os.stat(f).st_mtime_ns for f in files if os.path.exists(f)])
    elif cfg.checkpoint:
        model, name, train_size = load_checkpoint(cfg)
        stat = os.stat(cfg.checkpoint)  # a new checkpoint at the same path must not reuse old features
        ident = f"{os.path.abspath(cfg.checkpoint)}:{stat.st_size}:{stat.st_mtime_ns}:{name}"
        size = cfg.global_size or train_size
    elif cfg.model == "pixels":
        model, ident = nn.Flatten(), "pixels"  # 3 * size * size features
    else:  # random init, seeded: as minimal_vit_inet.py builds it before training
        torch.manual_seed(cfg.seed)
        model, ident = mvi.build_backbone(cfg.model, size), f"timm:{cfg.model}:random:{cfg.seed}:{size}"
    return model.eval().requires_grad_(False).to(device), size, mean, std, ident


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: (B, 3, H, W) normalised -> (B, F) features of the protocol."""
    if has_cls_intermediates(model):
        # official README: the CLS token of the last two blocks, each through the final norm, concatenated
        inter = model.forward_intermediates(x, indices=2, norm=True, return_prefix_tokens=True,
                                            output_fmt="NLC", intermediates_only=True)  # 2 x (tokens, prefix)
        return torch.cat([prefix[:, 0] for _, prefix in inter], dim=-1)  # (B, 2D)
    return model(x)  # timm with num_classes=0: mean of patch tokens (ViT without CLS), pooled map (CNN)


def has_cls_intermediates(model: nn.Module) -> bool:
    """A ViT with a CLS token whose blocks' outputs timm can return with their prefix tokens (not CaiT, XCiT,
    PiT, VOLO: their forward_intermediates has no return_prefix_tokens; they get the model's own pooling)."""
    inter = getattr(model, "forward_intermediates", None)
    if getattr(model, "cls_token", None) is None or inter is None:
        return False
    return "return_prefix_tokens" in inspect.signature(inter).parameters


# ---- Extraction and cache: each split once, every rank a share, rank 0 saves ----

def cached_features(cfg, model, mean, std, ident, dataset, role, device, rank, world) -> str:
    """Path of the cached features and labels of one split (role "train" or "val"); on a cache miss, extracted
    from centre crops at cfg.global_size (mvi.eval_transform). All the run's collectives are in here: no rank
    waits in one while rank 0 trains the heads."""
    path, key = cache_path(cfg, ident, dataset, role, mean, std)
    exists = [os.path.exists(path)]
    if world > 1:
        dist.broadcast_object_list(exists, src=0)  # rank 0's file decides: every rank takes the same branch
    if exists[0]:
        print0(f"{dataset} {role}: features from the cache {path}")
        return path
    # every rank loads the split: datasets' file locks let one process per node download and prepare it while
    # the others wait on the lock, not in a collective (rank 0 preparing ImageNet alone would time them out)
    ds, image_col, label_col = load_labelled(cfg, dataset, role)
    ds = split_dataset_by_node(ds, rank, world)  # map-style: contiguous shares, so rank order is row order
    loader = mvi.eval_loader(cfg, ds, image_col, label_col, 0, 1, cfg.batch_size)  # 0, 1: ds is the share
    feats, y, t0 = [], [], time.perf_counter()
    bar = tqdm(loader, desc=f"{dataset} {role}", disable=True if rank else None)  # None: terminal only
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        for x, labels in bar:
            x = mvi.normalize(x.to(device, non_blocking=True), mean=mean, std=std)  # the weights' own
            feats.append(embed(model, x).float())  # (B, F), left on the device: no sync per batch
            y.append(labels)
    peak = torch.stack([b.abs().max() for b in feats]).max() if feats else torch.zeros((), device=device)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # every rank picks the same dtype
    # fp16 (max 65504) halves what rank 0 gathers and caches (ImageNet, ViT-L: 5.2 GB instead of 10.5)
    dtype = torch.float16 if peak < 6e4 else torch.float32
    feats = [b.to(dtype).cpu() for b in feats]
    feats, y, skipped = gather_rows(feats, y, loader.dataset.skipped.value, rank, world)
    if rank != 0:
        return path
    if skipped:
        print0(f"{dataset} {role}: {skipped} unreadable image(s), each replaced by the next readable one")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mvi.write_atomic(dict(features=feats, labels=y.long(), key=key), path)  # never a half cache
    seconds = time.perf_counter() - t0
    print0(f"{dataset} {role}: extracted {tuple(feats.shape)} features in {seconds:.0f} s -> {path}")
    return path


def cache_path(cfg, ident, dataset, role, mean, std):
    """(file, key): the key lists everything the features depend on; its hash names the file."""
    split = role if dataset in TRANSFER else (cfg.train_split if role == "train" else cfg.val_split)
    where = os.path.abspath(dataset) if os.path.isdir(dataset) else dataset
    key = json.dumps([ident, where, TRANSFER.get(dataset), cfg.dataset_config, cfg.dataset_revision,
                      cfg.dataset_data_dir, split, cfg.image_column, cfg.label_column, cfg.global_size,
                      mean, std, cfg.bf16])
    tag = "".join(c if c.isalnum() else "_" for c in os.path.basename(dataset.rstrip("/")))  # for the reader
    file = f"{tag}-{role}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    return os.path.join(cfg.out_dir, "features", file), key


# ---- Evaluation on cached features: k-shot draws, LayerNorm + Linear head, weighted k-NN, tables ----

def sample_shots(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of k training images per class (all of a class that has fewer), drawn with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)  # one shuffle, then the first k of each class in it
    picks = [perm[labels[perm] == c][:k] for c in labels.unique()]
    return torch.cat(picks).sort().values


def train_head(x, y, x_val, y_val, num_classes: int, cfg: Config, seed: int, device) -> float:
    """Fit LayerNorm + Linear with AdamW (official README) to x (N, F), y (N,); top-1 (%) on x_val, y_val."""
    torch.manual_seed(seed)  # head initialisation
    g = torch.Generator().manual_seed(seed)  # batch order
    x, y = x.to(device), y.to(device)
    head = nn.Sequential(nn.LayerNorm(x.shape[1]), nn.Linear(x.shape[1], num_classes)).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.head_batch, len(x))
    per_epoch = len(x) // batch  # the incomplete tail batch is dropped
    steps = max(cfg.epochs * per_epoch, cfg.min_steps)
    for step in range(steps):
        if step % per_epoch == 0:  # a new epoch, a new order
            perm = torch.randperm(len(x), generator=g)
        start = (step % per_epoch) * batch
        i = perm[start:start + batch].to(device)
        for group in opt.param_groups:  # official README: warm-up, cosine to lr / 1000, as in pretraining
            group["lr"] = mvi.lr_at(step, steps, round(cfg.warmup_frac * steps), cfg.lr)
        loss = F.cross_entropy(head(x[i].float()), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        correct = sum((head(xv.to(device).float()).argmax(1).cpu() == yv).sum().item()
                      for xv, yv in zip(x_val.split(4096), y_val.split(4096)))
    return 100.0 * correct / len(y_val)


@torch.no_grad()
def knn_accuracy(x, y, x_val, y_val, num_classes: int, k: int, temperature: float, device) -> float:
    """DINO's k-NN top-1 (%): the k most cosine-similar training features vote with weight exp(sim / T)."""
    train = F.normalize(x.to(device).float(), dim=1)  # (N, F); queries x_val: (M, F)
    y = y.to(device)
    k, correct = min(k, len(train)), 0
    for q, t in zip(x_val.split(256), y_val.split(256)):
        sim = F.normalize(q.to(device).float(), dim=1) @ train.T  # (B, N) cosine similarities
        top, idx = sim.topk(k, dim=1)  # (B, k)
        votes = torch.zeros(len(q), num_classes, device=device)
        votes.scatter_add_(1, y[idx], (top / temperature).exp())  # (B, C)
        correct += (votes.argmax(1).cpu() == t).sum().item()
    return 100.0 * correct / len(y_val)


def evaluate(cfg, train, val, shots, device) -> dict:
    """{shots: {linear, knn, linear_std, knn_std, draws: [...]}} for one dataset's cached features."""
    x, y, x_val, y_val = train["features"], train["labels"], val["features"], val["labels"]
    num_classes = int(max(y.max(), y_val.max())) + 1
    out = {}
    for shot in shots:
        draws = []
        for seed in range(cfg.seed, cfg.seed + (1 if shot == "all" else cfg.draws)):
            idx = slice(None) if shot == "all" else sample_shots(y, shot, seed)  # slice(None): no copy
            xs, ys = x[idx], y[idx]
            linear = train_head(xs, ys, x_val, y_val, num_classes, cfg, seed, device)
            knn = float("nan")  # --knn_k 0: no k-NN
            if cfg.knn_k:
                knn = knn_accuracy(xs, ys, x_val, y_val, num_classes, cfg.knn_k, cfg.knn_temperature, device)
            draws.append(dict(seed=seed, n_train=len(ys), linear=linear, knn=knn))
        acc = {m: torch.tensor([d[m] for d in draws], dtype=torch.float64) for m in ("linear", "knn")}
        out[str(shot)] = dict(linear=acc["linear"].mean().item(), knn=acc["knn"].mean().item(),
                              linear_std=acc["linear"].std(unbiased=False).item(),  # spread over the draws
                              knn_std=acc["knn"].std(unbiased=False).item(), draws=draws)
    return out


def format_table(results: dict, metric: str = "linear") -> str:
    """The official README's layout: a row per shots setting, a column per dataset, then the average.
    results: {dataset: {shots: {metric, metric_std, draws}}}; k-shot cells show mean ± std over draws."""
    names = list(results)
    lines = ["| shots | " + " | ".join(os.path.basename(n.rstrip("/")) for n in names) + " | avg |",
             "|---" * (len(names) + 2) + "|"]
    for s in results[names[0]]:
        cells = []
        for r in (results[n][s] for n in names):
            spread = f" ± {r[metric + '_std']:.2f}" if len(r["draws"]) > 1 else ""
            cells.append(f"{r[metric]:.2f}{spread}")
        avg = sum(results[n][s][metric] for n in names) / len(names)
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {avg:.2f} |")
    return "\n".join(lines)


# ---- main: backbone, then per dataset: cached features (train, val) -> heads and k-NN -> tables ----

def main(cfg: Config):
    ddp, rank, world, device = mvi.setup_distributed()
    names, shots = dataset_names(cfg.dataset), shot_values(cfg.shots)
    model, size, mean, std, ident = build_model(cfg, device)
    cfg = dataclasses.replace(cfg, global_size=size)  # resolved: mvi.eval_loader reads cfg.global_size
    print0(f"torch {torch.__version__} | timm {timm.__version__} | datasets {datasets.__version__} | "
           f"{world} process(es) on {device.type} | extraction {'bf16' if cfg.bf16 else 'fp32'}")
    print0("config: " + json.dumps(dataclasses.asdict(cfg)))
    print0(f"derived: backbone {ident} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | "
           f"{size} px | datasets {names} | shots {shots} ({cfg.draws} draws for k-shot)")

    paths, timings = {}, {}  # 1. every rank: the features of every split, extracted or from the cache
    for name in names:
        t0 = time.perf_counter()
        paths[name] = [cached_features(cfg, model, mean, std, ident, name, role, device, rank, world)
                       for role in ("train", "val")]
        timings[name] = dict(features_s=round(time.perf_counter() - t0, 1))
    mvi.close_distributed(ddp)  # no collective after this: ranks 1.. end while rank 0 trains the heads
    if rank != 0:
        return None

    results = {}  # 2. rank 0 alone: the heads are small
    for name in names:
        t0 = time.perf_counter()
        train, val = [torch.load(p, weights_only=True) for p in paths[name]]  # each {features, labels, key}
        results[name] = evaluate(cfg, train, val, shots, device)
        t = timings[name]
        t["heads_s"] = round(time.perf_counter() - t0, 1)
        for s, r in results[name].items():
            print0(f"{name} | {s} shot(s) | linear {r['linear']:.2f} ± {r['linear_std']:.2f} | "
                   f"k-NN {r['knn']:.2f} ± {r['knn_std']:.2f} | train {r['draws'][0]['n_train']} "
                   f"val {len(val['labels'])} | features {t['features_s']} s, heads {t['heads_s']} s")
    write_outputs(cfg, ident, results, timings, feature_dim=int(train["features"].shape[1]))
    return results


# ---- Plumbing: flags, checkpoints, datasets, gathering over ranks, outputs ----

def parse_config(argv=None) -> Config:
    """argparse from Config (tuples take one or more values, bools true/false); bad flags: one line, here."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif f.type is tuple:
            p.add_argument(f"--{f.name}", nargs="+", default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = vars(p.parse_args(argv))
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})  # nargs gives lists
    dataset_names(cfg.dataset)  # fail fast, before any model or data is loaded
    shot_values(cfg.shots)
    if cfg.model and cfg.model != "pixels" and not timm.is_model(cfg.model) and not cfg.model.startswith(HUB):
        sys.exit(f"error: unknown timm model {cfg.model!r}; see timm.list_models('*vit*')")
    if not (cfg.checkpoint or cfg.model):
        sys.exit("error: pass --checkpoint (a minimal_vit_inet.py run) and/or --model (a timm name)")
    if cfg.pretrained and (cfg.checkpoint or cfg.model == "pixels"):
        sys.exit("error: --pretrained true loads timm's own weights for --model; it does not go with "
                 "--checkpoint or --model pixels")
    if cfg.draws < 1 or cfg.knn_k < 0:
        sys.exit(f"error: --draws must be >= 1 and --knn_k >= 0, got {cfg.draws} and {cfg.knn_k}")
    return cfg


def dataset_names(names) -> list:
    """Expand "transfer" to the 8 short names; reject what is neither a short name, a folder nor a hub id."""
    out = []
    for name in names:
        if name == "transfer":
            out += list(TRANSFER)
        elif name in TRANSFER or os.path.isdir(name) or "/" in name:
            out.append(name)
        else:
            sys.exit(f"error: unknown dataset {name!r}: not a short name ({', '.join(TRANSFER)}, transfer), "
                     f"a local folder, or a hub id (owner/name)")
    return out


def shot_values(shots) -> list:
    """["1", "10", "all"] -> [1, 10, "all"]."""
    if not all(s == "all" or (str(s).isdecimal() and int(s) > 0) for s in shots):
        sys.exit(f"error: --shots takes positive integers and/or 'all', got {' '.join(map(str, shots))}")
    return [s if s == "all" else int(s) for s in shots]


def load_checkpoint(cfg: Config):
    """(backbone with the weights of --checkpoint, its timm name, its training size in px)."""
    if not os.path.isfile(cfg.checkpoint):
        sys.exit(f"error: checkpoint {cfg.checkpoint} not found")
    obj = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)  # tensors and plain values only
    run = isinstance(obj, dict) and "backbone" in obj and "config" in obj  # ckpt.pt, else backbone.pth
    name = cfg.model or (obj["config"]["model"] if run else "")
    if not name:
        sys.exit(f"error: {cfg.checkpoint} is a bare state dict (backbone.pth): pass --model, the timm name "
                 f"it was trained with")
    size = obj["config"]["global_size"] if run else (cfg.global_size or 224)
    state = obj["backbone"] if run else obj
    model = mvi.build_backbone(name, size)  # pos_embed sized as in training; other sizes via dynamic_img_size
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:  # a one-line summary, not torch's list of every key
        sys.exit(f"error: checkpoint {cfg.checkpoint} does not match model {name!r} at {size} px: "
                 f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                 f"{len(reshaped)} of another shape {reshaped[:3]}")
    model.load_state_dict(state)
    return model, name, size


def load_labelled(cfg: Config, dataset: str, role: str):
    """(dataset, image column, label column) of role "train" or "val" of a short name, folder or hub id."""
    if dataset in TRANSFER:
        hub_id, train, test, label, files = TRANSFER[dataset]
        split = train if role == "train" else test
        try:
            ds = datasets.load_dataset(hub_id, data_files=files, split=split)
        except (ConnectionError, ValueError, FileNotFoundError) as err:  # DatasetNotFoundError is one too
            sys.exit(f"error: {dataset} ({hub_id}): {mvi.hub_error(hub_id, '', split, err)}")
        return (ds, *mvi.find_columns(ds, cfg.image_column, label))
    split = cfg.train_split if role == "train" else cfg.val_split
    ds = mvi.load_split(dataset, split, cfg.dataset_config, cfg.streaming, missing_ok=True,
                        revision=cfg.dataset_revision, data_dir=cfg.dataset_data_dir)
    if ds is None:
        sys.exit(f"error: dataset {dataset} has no split {split!r}; pass --{role}_split")
    image_col, label_col = mvi.find_columns(ds, cfg.image_column, cfg.label_column)
    if label_col is None or label_col not in (ds.features or {}):
        sys.exit(f"error: dataset {dataset} ({split}) has no label column among {list(ds.features or {})}; "
                 f"a probe needs labels: pass --label_column")
    return ds, image_col, label_col


def gather_rows(feats: list, y: list, skipped: int, rank: int, world: int):
    """On rank 0: every rank's batches (B, F) and (B,), concatenated in rank order, and the skipped images."""
    parts = [(feats, y, skipped)]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object((feats, y, skipped), parts, dst=0)  # lists of CPU batches: a rank may have none
    if rank != 0:
        return None, None, None
    feats, y, skipped = [], [], 0
    for rank_feats, rank_y, rank_skipped in parts:  # in rank order
        feats += rank_feats
        y += rank_y
        skipped += rank_skipped
    return torch.cat(feats), torch.cat(y), skipped


def write_outputs(cfg, ident, results, timings, feature_dim):
    """Print the tables; write them to table.md, and every number to results.json."""
    tables = {m: format_table(results, m) for m in ("linear", "knn")}
    knn_title = f"k-NN top-1 (%, k={cfg.knn_k}, T={cfg.knn_temperature})"
    text = f"Linear probe top-1 (%), {ident}\n\n{tables['linear']}\n\n{knn_title}\n\n{tables['knn']}\n"
    print0("\n" + text)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), backbone=ident, feature_dim=feature_dim,
                       results=results, timings=timings, tables=tables), f, indent=1)
    print0(f"wrote {os.path.join(cfg.out_dir, 'results.json')} and table.md")


if __name__ == "__main__":
    mvi.run(main, parse_config())
