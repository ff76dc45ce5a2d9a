r"""Frozen-feature linear probe and k-NN of a LeJEPA backbone (or any timm model): ImageNet-1k top-1, and the
official README's transfer table (1-shot, 10-shot and all-data probes on 8 datasets, with their average).
Each split's features are extracted once (cached in --out_dir/features; under torchrun each rank a share),
then rank 0 trains the heads. Outputs in --out_dir: results.json (every number and draw) and table.md.

  # a pretraining run (model and size from its checkpoint): ImageNet-1k, then the transfer table
  torchrun --nproc_per_node=8 linear_probe.py --checkpoint out/lejepa/ckpt.pt
  torchrun --nproc_per_node=8 linear_probe.py --checkpoint out/lejepa/ckpt.pt --dataset transfer \
      --shots 1 10 all
  # its export/ folder (timm's Hugging Face format) on an image folder; timm's own weights, 2 transfer sets
  python linear_probe.py --checkpoint out/lejepa/export --dataset /data/cifar10-jpg --val_split test
  python linear_probe.py --model resnet50 --pretrained true --dataset cifar10 pets --shots 10 all
Measured: CIFAR-10 (50k + 10k images, resnet18 at 32 px) in 5.7 min on a 2-core CPU, 26 s on one H100 (a rerun
reads the cache); ImageNet and the transfer table: not measured yet. ImageNet-1k is gated: `hf auth login`."""
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
from tqdm import tqdm

import minimal_vit_inet as mvi  # data loading, backbone construction, eval transform, distributed setup


@dataclasses.dataclass
class Config:  # every field is a flag: --field value (tuples: one or more values, bools: true / false)
    # backbone
    checkpoint: str = ""  # ckpt.pt of minimal_vit_inet.py (holds model and size), or its export/ folder
    model: str = ""  # timm name ("" = the checkpoint's); "pixels" = the normalised image itself (a baseline)
    pretrained: bool = False  # timm's own weights for --model: another model on the same protocol
    global_size: int = 0  # px, resize + centre crop; 0 = the checkpoint's, timm's for --pretrained, else 224
    # data
    dataset: tuple = ("timm/imagenet-1k-wds",)  # hub ids, folders or TRANSFER names; "transfer" = all 8
    train_split: str = "train"  # fits the head (TRANSFER names use their own splits)
    val_split: str = "validation"  # the accuracy is reported on it (image folders often call it "test")
    image_column: str = ""  # "" = auto (Image feature, else image/img/jpg)
    label_column: str = ""  # "" = auto (ClassLabel feature, else label/cls/fine_label)
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
    knn_k: int = 20  # DINO's k-NN: neighbours that vote
    knn_temperature: float = 0.07  # DINO: vote weight exp(cosine / T)
    seed: int = 0  # random-init weights, k-shot draws, head init and batch order
    out_dir: str = "out/probe"  # features/ cache, results.json, table.md


HUB = ("hf-hub:", "local-dir:")  # timm's prefixes for weights in the Hugging Face format
# short name: (hub id, train split, test split, label column, data_files), from the dataset cards
TRANSFER = {
    "dtd": ("mcimpoi/dtd_split_1", "train+validation", "test", "label", None),  # split 1 of the official 10
    "aircraft": ("Donghyun99/FGVC-Aircraft", "train+val", "test", "variation", None),  # "label": 70 families
    "cars": ("tanganke/stanford_cars", "train", "test", "label",  # data_files: else all 9 splits are prepared
             {"train": "data/train-*.parquet", "test": "data/test-*.parquet"}),  # (7 corruptions, about 6 GB)
    "cifar10": ("uoft-cs/cifar10", "train", "test", "label", None),
    "cifar100": ("uoft-cs/cifar100", "train", "test", "fine_label", None),  # not the 20 coarse labels
    "flowers102": ("dpdl-benchmark/oxford_flowers102", "train+validation", "test", "label", None),
    "food101": ("ethz/food101", "train", "validation", "label", None),  # validation = the official test set
    "pets": ("timm/oxford-iiit-pet", "train", "test", "label", None),  # train = the official trainval
}


# ---- Backbone and features (official README, "Linear Probe Evaluation"): frozen, alike for every model ----
def build_model(cfg: Config, device):
    """-> (frozen model on device, in eval mode; evaluation size in px, mean, std, identity for the cache)."""
    name, size, mean, std = cfg.model, cfg.global_size or 224, mvi.IMAGENET_MEAN, mvi.IMAGENET_STD
    if cfg.checkpoint and name.startswith(HUB):  # weights named twice: --checkpoint's are the ones probed
        mvi.print0(f"note: probing --checkpoint {cfg.checkpoint}; the weights of --model {name} are not used")
        name = ""
    if os.path.isdir(cfg.checkpoint):  # an export folder of minimal_vit_inet.py (timm's Hugging Face format)
        name = "local-dir:" + os.path.abspath(cfg.checkpoint)
    if name.startswith(HUB) or cfg.pretrained:  # weights with their mean, std and size
        try:  # dynamic_img_size: a ViT also at another --global_size than it was trained at
            model = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True)
        except TypeError:  # a convnet: any size works
            model = timm.create_model(name, pretrained=True, num_classes=0)
        data = timm.data.resolve_model_data_config(model)
        mean, std, size = data["mean"], data["std"], cfg.global_size or data["input_size"][-1]
        weights = model.pretrained_cfg  # which weights: hub repo and tag (a new default tag: new features)
        ident = f"timm:{name}:pretrained:{weights.get('hf_hub_id')}:{weights.get('tag')}"
    elif cfg.checkpoint:  # a ckpt.pt of minimal_vit_inet.py: {model: LeJEPA's state_dict, config: the run's}
        if not os.path.isfile(cfg.checkpoint):
            sys.exit(f"error: checkpoint {cfg.checkpoint} not found")
        ckpt = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)  # tensors and plain values
        name, train_size = name or ckpt["config"]["model"], ckpt["config"]["global_size"]
        model = mvi.build_backbone(name, train_size, **ckpt["config"].get("model_kwargs") or {})  # as trained
        state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
        try:
            model.load_state_dict(state)
        except RuntimeError as err:  # one line, not torch's list of every key
            sys.exit(f"error: checkpoint {cfg.checkpoint} does not match model {name!r} at {train_size} px: "
                     f"{' '.join(str(err).split()[:20])} ...")
        ident, size = f"{os.path.abspath(cfg.checkpoint)}:{name}", cfg.global_size or train_size
    elif cfg.model == "pixels":
        model, ident = nn.Flatten(), "pixels"  # 3 * size * size features
    else:  # random init, seeded: as minimal_vit_inet.py builds it before training
        torch.manual_seed(cfg.seed)
        model, ident = mvi.build_backbone(cfg.model, size), f"timm:{cfg.model}:random:{cfg.seed}:{size}"
    if cfg.checkpoint:  # a new checkpoint or export at the same path must not reuse old features
        written = os.path.join(cfg.checkpoint, "config.json") if "local-dir:" in name else cfg.checkpoint
        ident += f":{os.stat(written).st_mtime_ns}"
    return model.eval().requires_grad_(False).to(device), size, mean, std, ident


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: (B, 3, H, W) -> (B, F); official README: the last two blocks' CLS tokens through the final norm."""
    if has_cls_intermediates(model):
        inter = model.forward_intermediates(x, indices=2, norm=True, return_prefix_tokens=True,
                                            output_fmt="NLC", intermediates_only=True)  # 2 x (tokens, prefix)
        return torch.cat([prefix[:, 0] for _, prefix in inter], dim=-1)  # (B, 2D)
    return model(x)  # timm with num_classes=0: mean of patch tokens (ViT without CLS), pooled map (CNN)


def has_cls_intermediates(model: nn.Module) -> bool:
    """A ViT with a CLS token whose blocks' outputs timm can return with their prefix tokens (not CaiT, XCiT,
    PiT, VOLO: their forward_intermediates has no return_prefix_tokens; they get the model's own pooling)."""
    inter = getattr(model, "forward_intermediates", None)
    has_cls = getattr(model, "cls_token", None) is not None
    return has_cls and inter is not None and "return_prefix_tokens" in inspect.signature(inter).parameters


# ---- Extraction and cache: each split once, every rank a share, rank 0 saves ----
def cached_features(cfg, model, mean, std, ident, dataset, role, device, rank, world) -> str:
    """Path of the features and labels of role "train" or "val", extracted on a cache miss. All the run's
    collectives are in here: no rank waits in one while rank 0 trains the heads."""
    path, key = cache_path(cfg, ident, dataset, role, mean, std)
    exists = [os.path.exists(path)]
    if world > 1:
        dist.broadcast_object_list(exists, src=0)  # rank 0's file decides: every rank takes the same branch
    if exists[0]:
        mvi.print0(f"{dataset} {role}: features from the cache {path}")
        return path
    ds, image_col, label_col = load_labelled(cfg, dataset, role)  # every rank: one prepares, others wait
    ds = split_dataset_by_node(ds, rank, world)  # contiguous shares, so rank order is row order
    loader = mvi.eval_loader(cfg, ds, image_col, label_col, 0, 1, cfg.batch_size)  # 0, 1: ds is the share
    feats, y, t0 = [], [], time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        for x, labels in tqdm(loader, desc=f"{dataset} {role}", disable=True if rank else None):  # None: tty
            x = mvi.normalize(x.to(device, non_blocking=True), mean=mean, std=std)  # the weights' own
            feats.append(embed(model, x).float())  # (B, F), left on the device: no sync per batch
            y.append(labels)
    peak = torch.stack([b.abs().max() for b in feats]).max() if feats else torch.zeros((), device=device)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # every rank picks the same dtype
    # fp16 (max 65504) halves what rank 0 gathers and caches (ImageNet, ViT-L: 5.2 GB instead of 10.5)
    dtype = torch.float16 if peak < 6e4 else torch.float32
    share = ([b.to(dtype).cpu() for b in feats], y)  # CPU batches (B, F) and (B,); a rank may have none
    parts = [share]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(share, parts, dst=0)  # to rank 0: every rank's share, in rank order = row order
    if rank == 0:
        feats, y = torch.cat([b for f, _ in parts for b in f]), torch.cat([b for _, ys in parts for b in ys])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mvi.write_atomic(dict(features=feats, labels=y.long(), key=key), path)  # never a half cache
        mvi.print0(f"{dataset} {role}: extracted {tuple(feats.shape)} in {time.perf_counter() - t0:.0f} s")
    return path


def cache_path(cfg, ident, dataset, role, mean, std):
    """(file, key): the key lists everything the features depend on; its hash names the file."""
    split = role if dataset in TRANSFER else (cfg.train_split if role == "train" else cfg.val_split)
    where = os.path.abspath(dataset) if os.path.isdir(dataset) else dataset
    key = json.dumps([ident, where, TRANSFER.get(dataset), split, cfg.image_column, cfg.label_column,
                      cfg.global_size, mean, std, cfg.bf16])
    tag = "".join(c if c.isalnum() else "_" for c in os.path.basename(dataset.rstrip("/")))  # for the reader
    file = f"{tag}-{role}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    return os.path.join(cfg.out_dir, "features", file), key


# ---- Evaluation on cached features: k-shot draws, LayerNorm + Linear head, weighted k-NN, tables ----
def sample_shots(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of k training images per class (all of a class that has fewer), drawn with a fixed seed."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))  # then k of each class
    return torch.cat([perm[labels[perm] == c][:k] for c in labels.unique()]).sort().values


def train_head(x, y, x_val, y_val, num_classes: int, cfg: Config, seed: int, device) -> float:
    """Fit LayerNorm + Linear with AdamW (official README) to x (N, F), y (N,); top-1 (%) on x_val, y_val."""
    torch.manual_seed(seed)  # head initialisation
    g = torch.Generator().manual_seed(seed)  # batch order
    x, y = x.to(device), y.to(device)
    head = nn.Sequential(nn.LayerNorm(x.shape[1]), nn.Linear(x.shape[1], num_classes)).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.head_batch, len(x))
    per_epoch = len(x) // batch
    steps = max(cfg.epochs * per_epoch, cfg.min_steps)
    for step in range(steps):
        if step % per_epoch == 0:  # a new epoch, a new order; the incomplete tail batch is dropped
            batches = torch.randperm(len(x), generator=g).to(device).split(batch)
        i = batches[step % per_epoch]
        # official README: warm-up, then cosine to lr / 1000, as in pretraining
        opt.param_groups[0]["lr"] = mvi.lr_at(step, steps, round(cfg.warmup_frac * steps), cfg.lr)
        loss = F.cross_entropy(head(x[i].float()), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * (head(x_val.to(device).float()).argmax(1).cpu() == y_val).double().mean().item()


@torch.no_grad()
def knn_accuracy(x, y, x_val, y_val, num_classes: int, k: int, temperature: float, device) -> float:
    """DINO's k-NN top-1 (%): the k most cosine-similar training features vote with weight exp(sim / T)."""
    train, y = F.normalize(x.to(device).float(), dim=1), y.to(device)  # (N, F), (N,); queries x_val: (M, F)
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
            knn = knn_accuracy(xs, ys, x_val, y_val, num_classes, cfg.knn_k, cfg.knn_temperature, device)
            draws.append(dict(seed=seed, n_train=len(ys), linear=linear, knn=knn))
        out[str(shot)] = dict(draws=draws)
        for m in ("linear", "knn"):  # mean and spread over the draws
            acc = torch.tensor([d[m] for d in draws], dtype=torch.float64)
            out[str(shot)].update({m: acc.mean().item(), m + "_std": acc.std(unbiased=False).item()})
    return out


def format_table(results: dict, metric: str = "linear") -> str:
    """The official README's layout: a row per shots setting, a column per dataset, then the average;
    results: {dataset: {shots: {metric, metric_std, draws}}}, k-shot cells: mean ± std over the draws."""
    names = list(results)
    lines = ["| shots | " + " | ".join(os.path.basename(n.rstrip("/")) for n in names) + " | avg |",
             "|---" * (len(names) + 2) + "|"]
    for s in results[names[0]]:
        row = [results[n][s] for n in names]
        cells = [f"{r[metric]:.2f}" + (f" ± {r[metric + '_std']:.2f}" if len(r["draws"]) > 1 else "")
                 for r in row]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {sum(r[metric] for r in row) / len(row):.2f} |")
    return "\n".join(lines)


# ---- main: backbone, then per dataset: cached features (train, val) -> heads and k-NN -> tables ----
def main(cfg: Config):
    _, rank, world, device = mvi.setup_distributed()
    model, size, mean, std, ident = build_model(cfg, device)
    cfg = dataclasses.replace(cfg, global_size=size)  # resolved: mvi.eval_loader reads cfg.global_size
    params = sum(p.numel() for p in model.parameters())
    mvi.print0(f"torch {torch.__version__} | timm {timm.__version__} | datasets {datasets.__version__} | "
               f"{world} process(es) on {device.type} | backbone {ident}, {params:,} params")
    mvi.print0("config: " + json.dumps(dataclasses.asdict(cfg)))
    paths = {name: [cached_features(cfg, model, mean, std, ident, name, role, device, rank, world)
                    for role in ("train", "val")] for name in cfg.dataset}  # 1. every rank: extract or read
    mvi.close_distributed()  # no collective after this: ranks 1.. end while rank 0 trains the heads
    if rank != 0:
        return None
    results, timings = {}, {}  # 2. rank 0 alone: the heads are small
    for name in cfg.dataset:
        t0 = time.perf_counter()
        train, val = [torch.load(p, weights_only=True) for p in paths[name]]  # each {features, labels, key}
        results[name] = evaluate(cfg, train, val, cfg.shots, device)
        timings[name] = dict(heads_s=round(time.perf_counter() - t0, 1))
        mvi.print0(f"{name}: heads in {timings[name]['heads_s']} s\n{format_table({name: results[name]})}")
    tables = {m: format_table(results, m) for m in ("linear", "knn")}  # 3. the tables, then every number
    text = (f"Linear probe top-1 (%), {ident}\n\n{tables['linear']}\n\n"
            f"k-NN top-1 (%, k={cfg.knn_k}, T={cfg.knn_temperature})\n\n{tables['knn']}\n")
    mvi.print0("\n" + text)
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), backbone=ident, feature_dim=train["features"].shape[1],
                       results=results, timings=timings, tables=tables), f, indent=1)
    return results


# ---- Plumbing: flags, datasets ----
def parse_config(argv=None) -> Config:
    """argparse from Config; a bad flag: one line, here. --dataset comes back with "transfer" expanded."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):  # a mistyped bool is refused; in strings, ~ is home, as in a shell
        parse = {bool: mvi.flag, int: int, float: float}.get(f.type, os.path.expanduser)  # strings, tuples
        p.add_argument(f"--{f.name}", type=parse, default=f.default, nargs="+" if f.type is tuple else None)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()})
    names = [n for name in cfg.dataset for n in (TRANSFER if name == "transfer" else [name])]
    for name in names:
        if not (name in TRANSFER or os.path.isdir(name) or "/" in name):
            sys.exit(f"error: unknown dataset {name!r}: not a short name ({', '.join(TRANSFER)}, transfer), "
                     f"a local folder, or a hub id (owner/name)")
    if not all(s == "all" or (s.isdecimal() and int(s) > 0) for s in cfg.shots):
        sys.exit(f"error: --shots takes positive integers and/or 'all', got {' '.join(cfg.shots)}")
    if not (cfg.checkpoint or cfg.model):
        sys.exit("error: pass --checkpoint (a minimal_vit_inet.py run) and/or --model (a timm name)")
    if cfg.model not in ("", "pixels") and not cfg.model.startswith(HUB) and not timm.is_model(cfg.model):
        sys.exit(f"error: unknown timm model {cfg.model!r}; see timm.list_models('*vit*')")
    if cfg.pretrained and (cfg.checkpoint or cfg.model == "pixels"):
        sys.exit("error: --pretrained true (timm's weights) does not go with --checkpoint or --model pixels")
    if cfg.draws < 1 or cfg.knn_k < 1:
        sys.exit(f"error: --draws must be >= 1 and --knn_k >= 1, got {cfg.draws} and {cfg.knn_k}")
    shots = tuple(s if s == "all" else int(s) for s in cfg.shots)
    return dataclasses.replace(cfg, dataset=tuple(names), shots=shots)


def load_labelled(cfg: Config, dataset: str, role: str):
    """(dataset, image column, label column) of role "train" or "val" of a short name, folder or hub id."""
    if dataset in TRANSFER:
        hub_id, train, test, label, files = TRANSFER[dataset]
        try:
            ds = datasets.load_dataset(hub_id, data_files=files, split=train if role == "train" else test)
        except (ConnectionError, ValueError, FileNotFoundError) as err:  # DatasetNotFoundError is one too
            sys.exit(f"error: {dataset} ({hub_id}): {mvi.hub_error(hub_id, err)}")
        return (ds, *mvi.find_columns(ds, cfg.image_column, label))
    split = cfg.train_split if role == "train" else cfg.val_split
    ds = mvi.load_split(dataset, split, missing_ok=True)
    if ds is None:
        sys.exit(f"error: dataset {dataset} has no split {split!r}; pass --{role}_split")
    image_col, label_col = mvi.find_columns(ds, cfg.image_column, cfg.label_column)
    if label_col not in ds.features:  # also None: no ClassLabel and no common name
        sys.exit(f"error: dataset {dataset} ({split}) has no label column among {list(ds.features)}; "
                 f"a probe needs labels: pass --label_column")
    return ds, image_col, label_col


if __name__ == "__main__":
    mvi.run(main, parse_config())
