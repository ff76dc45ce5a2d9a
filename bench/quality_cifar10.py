"""Side by side on CIFAR-10 at an equal CPU budget: the authors' minimal example (MINIMAL.md) against
minimal_vit_inet.py, the same backbone and data, every run probed by linear_probe.py.

Each run pretrains for --budget_min minutes of wall-clock, on the CIFAR-10 JPEGs' train split: every run of
one invocation first calibrates (a step's time, the start-up and end, an epoch end's evaluation and checkpoint),
back to back, so that one machine state sizes every schedule to fill what is left of its budget with all the
work the run does (calibration included; "min used" in the table); then each trains; linear_probe.py then
reports linear, k-NN and 10-shot linear top-1 on the test split (32 px centre view, LayerNorm + linear head).
Runs (--runs):
  official  the minimal example's recipe, written here from its published values (its code is not copied):
            V = 4 views of one size (crop scale 0.08-1), ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, grayscale 0.2,
            blur p 0.5 (7 taps), solarize 0.2; backbone + a 512-wide linear head, projector 2048-2048-16,
            lambda 0.02, 256 slices, AdamW lr 2e-3 wd 5e-2 on every weight, batch 256, a one-epoch linear
            warm-up from lr / 100, then cosine to an absolute 1e-3 (the example's eta_min); the invariance
            centres on all V views; the online probe reads every view
  NAME      minimal_vit_inet.py with RECIPES[NAME]'s flags (below), plus --flags (for every NAME run)
  NAME,--flag=value,...   the same with one ablation's difference (tagged in results.jsonl)
  pixels    the normalised 32 px pixels, probed alike (no training)
  random    the backbone at random init (the seed minimal_vit_inet.py starts from)
Every finished run appends a line to --out_dir/results.jsonl (flags, steps, img/s, the online probe per
epoch, linear / k-NN / 10-shot); --table prints that file as docs/recipe_cifar10.md's tables.

    python bench/quality_cifar10.py --budget_min 15 --epoch_images 10000 --runs official small pixels --seed 0
    python bench/quality_cifar10.py --budget_min 15 --epoch_images 10000 --runs small small,--lamb=0.02
    python bench/quality_cifar10.py --budget_min 30 --steps 1326 --epoch_images 10000 --runs small,--warmup_epochs=1
    python bench/quality_cifar10.py --table
--steps compares a difference that leaves the step's cost alone with a run already made at that many steps:
a seed and a step count give the same run, bit for bit, on one machine (the VM's speed, which drifts by a
fifth within minutes, then changes no run's length; only its duration). 20 calibration steps read a step's
time to within 10-20% on this VM, so after each calibrated run the bench prints the --steps that fill the same
budget at the pace the run kept (column s/step: start-up and epoch ends included): a pair whose "min used"
differ is rerun at those counts.
Data: ../shared/data/cifar10-jpg.tar.gz (train/<class>/*.jpg 5000 per class, test/<class>/*.jpg 1000 per
class), extracted once to --root; the bench skips with a message when the archive is absent.
Measured: docs/recipe_cifar10.md (machine, date, every run).
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_IMAGES = 50_000

# minimal_vit_inet.py flags of each named recipe (data, model, size, seed and the schedule's length are added
# by the bench). "small" is the README's small-image command: the best measured so far (docs/recipe_cifar10.md).
RECIPES = {
    "small": "--n_global 4 --n_local 0 --batch_size 128 --proj_hidden 512 --proj_dim 16 "
             "--lamb 0.1 --lr 2e-3 --warmup_epochs 0.1 --final_lr_div 2",  # four views, no local: 2026-12-07
    # the official example's values as flags: the "official" run, but minimal_vit_inet.py's code path
    "official-flags": "--n_global 4 --n_local 0 --global_scale 0.08 1 --jitter 0.8 0.8 0.8 0.2 --lamb 0.02 "
                      "--proj_dim 16 --num_slices 256 --batch_size 256 --weight_decay 0.05 --lr 2e-3 "
                      "--warmup_epochs 1 --final_lr_div 2",
    # the same, but the cosine ends at lr / 1000 (the example's ends at an absolute 1e-3)
    "official-decay": "--n_global 4 --n_local 0 --global_scale 0.08 1 --jitter 0.8 0.8 0.8 0.2 --lamb 0.02 "
                      "--proj_dim 16 --num_slices 256 --batch_size 256 --weight_decay 0.05 --lr 2e-3 "
                      "--warmup_epochs 1",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget_min", type=float, default=15.0, help="pretraining wall-clock per run, minutes")
    p.add_argument("--runs", nargs="+", default=["official", "small", "pixels"])
    p.add_argument("--flags", default="", help="more minimal_vit_inet.py flags for the NAME runs (ablations)")
    p.add_argument("--tag", default="", help="a name for this ablation in results.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32, help="px of the views and of the probe's centre view")
    p.add_argument("--epoch_images", type=int, default=TRAIN_IMAGES,
                   help="images per epoch (the example's warm-up, the online probe's interval); fewer: more epochs")
    p.add_argument("--steps", type=int, default=0,
                   help="> 0: every trained run takes this many steps, no calibration: for differences that leave "
                        "the step's cost alone, beside a run of that length (a seed and a step count give the same "
                        "run, bit for bit, on one machine)")
    p.add_argument("--official_batch", type=int, default=256, help="the example's batch (smaller: a smoke run)")
    p.add_argument("--shots", nargs="+", default=["10", "all"])
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of every run (2 or 3: no faster)")
    p.add_argument("--threads", type=int, default=0, help="> 0: torch threads of every run")
    p.add_argument("--archive", default=os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg.tar.gz"))
    p.add_argument("--root", default="/tmp/cifar10-jpg", help="the extracted image folder")
    p.add_argument("--out_dir", default="/tmp/lejepa-quality")
    p.add_argument("--table", action="store_true", help="print results.jsonl as tables, run nothing")
    return p.parse_args(argv)


def run(cmd, log, args):
    """Run a script of the repo, its output in a log file; stop the bench if it fails."""
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"error: {cmd[0]} failed, see {log}:\n" + open(log).read()[-3000:])


def schedule(steps: int, batch: int, args) -> tuple:
    """About `steps` steps in as few epochs as hold them (an epoch: --epoch_images): (epochs, steps each)."""
    epochs = math.ceil(steps / max(1, args.epoch_images // batch))
    return epochs, math.ceil(steps / epochs)


def steps_left(spent_s: float, plan: dict, args) -> int:
    """The steps that fill what is left of the budget after the calibration (spent_s), with the run's own
    start-up and end (fixed_s) and an epoch end per epoch, its last one included (epoch_s: the online probe's
    evaluation; ours also checkpoint): both recipes pay for all the work they do in their own budget."""
    def seconds(steps):  # the run as schedule() sizes it: its epochs, each ending in an evaluation
        epochs, per_epoch = schedule(steps, plan["batch"], args)
        return plan["fixed_s"] + epochs * (per_epoch * plan["batch"] / plan["img_s"] + plan["epoch_s"])

    left_s = args.budget_min * 60 - spent_s
    steps = int(left_s * plan["img_s"] / plan["batch"])  # steps alone, no start-up or epoch ends: too many
    while steps > 10 and seconds(steps) > left_s:
        steps -= 1
    return max(10, steps)  # 10 at the least: a smoke run's budget holds no step


# ---- minimal_vit_inet.py runs ----------------------------------------------------------------------------
def ours(name: str, out: str, args, extra=(), steps=None) -> dict:
    """Without steps: a 30-step calibration run (thrown away), its img/s. With steps: the run, that long."""
    flags = (RECIPES[name] + " " + args.flags).split() + list(extra)
    sys.path.insert(0, ROOT)
    import minimal_vit_inet as mvi  # its own parser reads the batch size the flags give (the last one wins)
    batch = mvi.parse_config(["--model", args.model, "--global_size", str(args.size), *flags]).batch_size

    def pretrain(run_dir, steps, *more):
        epochs, per_epoch = schedule(steps, batch, args)
        cmd = ["minimal_vit_inet.py", "--dataset", args.root, "--val_split", "test", "--model", args.model,
               "--global_size", str(args.size), "--workers", str(args.workers), "--seed", str(args.seed), *flags,
               "--epochs", str(epochs), "--steps_per_epoch", str(per_epoch), "--out_dir", run_dir, *more]
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
        run(cmd, run_dir + ".log", args)
        return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]

    if steps is None:
        # 40 steps in epochs of 30, logged every 10: steps 11 to 30 time the step (2,560 images at batch 128, as
        # the official's 10 at 256); steps 31 to 40 also hold the epoch end at step 30 (evaluation, checkpoint)
        t0 = time.perf_counter()
        calib = pretrain(out + "-calib", 1000, "--stop_after", "40", "--log_every", "10", "--steps_per_epoch", "30")
        logs = [dict(step=0)] + [r for r in calib if "images_per_s" in r]
        seconds = {r["step"]: (r["step"] - prev["step"]) * batch / r["images_per_s"]  # each log interval's time
                   for prev, r in zip(logs, logs[1:])}
        if sorted(seconds) != [1, 10, 20, 30, 40]:  # it ended early (a SIGTERM: a checkpoint and exit 0)
            sys.exit(f"error: the calibration of {out} ended before step 40; see {out}-calib.log")
        step_s = (seconds[20] + seconds[30]) / 20
        return dict(img_s=batch / step_s, batch=batch, epoch_s=max(0.0, seconds[40] - 10 * step_s),
                    # start-up, the first 10 steps' excess (the loader's start, as the official's 2), save, exit
                    fixed_s=time.perf_counter() - t0 - 30 * step_s - seconds[40])
    records = pretrain(out, steps, "--log_every", "20")
    trained = [r for r in records if "loss" in r]
    return dict(steps=math.prod(schedule(steps, batch, args)), loss=trained[-1]["loss"],
                online=[r["probe_acc"] for r in records if "probe_acc" in r],
                backbone=["--checkpoint", os.path.join(out, "ckpt.pt")], flags=" ".join(flags))


# ---- the official minimal example's recipe, re-implemented ------------------------------------------------
def official(out: str, args, extra=(), steps=None) -> dict:
    """Without steps: 12 steps on weights thrown away after, and one evaluation. With steps: the run."""
    t_enter = time.perf_counter()
    import timm
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torchvision import datasets as tvd
    from torchvision.ops import MLP
    from torchvision.transforms import v2

    sys.path.insert(0, ROOT)
    from sigreg import SIGReg  # the same statistic as the example's: 17 knots on [0, 3], fresh slices per step

    if args.threads:
        torch.set_num_threads(args.threads)
    V, batch, lamb, lr, mean, std = 4, args.official_batch, 0.02, 2e-3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    aug = v2.Compose([v2.RandomResizedCrop(args.size, scale=(0.08, 1.0)),
                      v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), v2.RandomGrayscale(p=0.2),
                      v2.RandomApply([v2.GaussianBlur(kernel_size=7, sigma=(0.1, 2.0))], p=0.5),
                      v2.RandomApply([v2.RandomSolarize(threshold=128)], p=0.2), v2.RandomHorizontalFlip(),
                      *tensor])
    test_tf = v2.Compose([v2.Resize(args.size), v2.CenterCrop(args.size), *tensor])
    train_ds = tvd.ImageFolder(os.path.join(args.root, "train"), lambda img: torch.stack([aug(img) for _ in range(V)]))
    test_ds = tvd.ImageFolder(os.path.join(args.root, "test"), test_tf)
    torch.manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch, shuffle=True, drop_last=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)
    test = torch.utils.data.DataLoader(test_ds, 256, num_workers=args.workers)

    backbone = timm.create_model(args.model, pretrained=False, num_classes=512, drop_path_rate=0.1)
    projector = MLP(512, [2048, 2048, 16], norm_layer=nn.BatchNorm1d)
    probe = nn.Sequential(nn.LayerNorm(512), nn.Linear(512, len(train_ds.classes)))
    sigreg = SIGReg(num_slices=256, seed=args.seed)
    net = nn.ModuleList([backbone, projector])
    opt = torch.optim.AdamW([dict(params=net.parameters(), lr=lr, weight_decay=5e-2),
                             dict(params=probe.parameters(), lr=1e-3, weight_decay=1e-7)])

    def step(vs, y):
        emb = backbone(vs.flatten(0, 1))  # (N * V, 512), image-major
        proj = projector(emb).unflatten(0, (len(y), V)).transpose(0, 1)  # (V, N, 16)
        inv = (proj.mean(0) - proj).square().mean()
        lejepa = (1 - lamb) * inv + lamb * sigreg(proj)
        probe_loss = F.cross_entropy(probe(emb.detach()), y.repeat_interleave(V))
        opt.zero_grad()
        (lejepa + probe_loss).backward()
        opt.step()
        return lejepa

    def evaluate():  # the online probe's top-1 on the test split
        net.eval(), probe.eval()
        with torch.no_grad():
            correct = sum((probe(backbone(x)).argmax(1) == y).sum().item() for x, y in test)
        net.train(), probe.train()
        return correct / len(test_ds)

    if steps is None:  # calibration: 12 steps, timed over the last 10; one evaluation, as at an epoch's end
        batches = (b for _ in range(12) for b in loader)
        for i in range(12):
            if i == 2:
                t0 = time.perf_counter()
            step(*next(batches))
        step_s, t1 = (time.perf_counter() - t0) / 10, time.perf_counter()
        evaluate()
        return dict(img_s=batch / step_s, batch=batch, epoch_s=time.perf_counter() - t1,
                    fixed_s=t0 - t_enter - 2 * step_s)  # set-up (the 2 untimed steps are the run's steps)
    epochs, per_epoch = schedule(steps, batch, args)
    total, warmup = epochs * per_epoch, per_epoch  # the example warms up for one epoch
    if total <= warmup:
        sys.exit(f"error: {total} steps in the budget, not more than the example's one-epoch warm-up: give "
                 f"--budget_min more minutes or --epoch_images fewer images")
    s1 = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=1e-3)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [s1, s2], milestones=[warmup])
    online = []
    for epoch in range(epochs):
        for _, (vs, y) in zip(range(per_epoch), loader):
            loss = step(vs, y)
            sched.step()
        online.append(evaluate())
        print(f"official: epoch {epoch} | loss {loss.item():.4f} | online probe {online[-1]:.4f}", flush=True)
    state = {"backbone." + k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    os.makedirs(out, exist_ok=True)
    torch.save(dict(model=state, config=dict(model=args.model, global_size=args.size)),
               os.path.join(out, "ckpt.pt"))  # linear_probe.py reads the pooled embedding, as for ours
    return dict(steps=total, loss=loss.item(), online=online,
                backbone=["--checkpoint", os.path.join(out, "ckpt.pt")])


def pretrained(name: str, out: str, args, extra: list, steps=None) -> dict:
    return official(out, args, extra, steps) if name == "official" else ours(name, out, args, extra, steps)


# ---- probes, results ---------------------------------------------------------------------------------------
def probe(name: str, backbone: list, args) -> dict:
    out = os.path.join(args.out_dir, f"probe-{name}")
    run(["linear_probe.py", *backbone, "--dataset", args.root, "--val_split", "test", "--shots", *args.shots,
         "--workers", str(args.workers), "--global_size", str(args.size), "--out_dir", out], out + ".log", args)
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)["results"][args.root]
    return {f"{shot}-shot" if shot != "all" else "linear": res[shot]["linear"] for shot in res} | dict(
        knn=res["all"]["knn"])  # percentages


def label(r: dict) -> str:
    """A run's name in the tables: NAME and its tag; "(earlier flags)" if RECIPES[NAME] has changed since."""
    now = " ".join(RECIPES[r["name"]].split()) if r["name"] in RECIPES else None
    earlier = now and r.get("flags") and not (r["flags"] + " ").startswith(now + " ")  # now + an ablation's
    return f"{r['name']}{' ' + r['tag'] if r.get('tag') else ''}{' (earlier flags)' if earlier else ''}"


def table(path: str):
    rows = [json.loads(line) for line in open(path)]
    print("| run | seed | budget min | min used | steps | img/s | s/step | linear | k-NN | 10-shot | "
          "online probe per epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        online = ", ".join(f"{100 * a:.1f}" for a in r.get("online", []))
        img_s = f"{r['img_s']:.0f}" if r.get("img_s") else "-"  # "-": a run of --steps, not calibrated
        print(f"| {label(r)} | {r['seed']} | {r['budget_min']:g} | "
              f"{r.get('used_min', float('nan')):.1f} | {r.get('steps', '-')} | {img_s} | "
              f"{60 * r.get('pretrain_min', float('nan')) / r.get('steps', 1):.2f} | "  # start-up, epoch ends included
              f"{r['linear']:.2f} | {r['knn']:.2f} | "
              f"{r.get('10-shot', float('nan')):.2f} | {online} |")
    runs = {}  # the same run at the same budget over its seeds: the targets are means of 2 seeds
    for r in rows:  # the same flags too: a recipe changed under its name is not averaged with its past
        runs.setdefault((label(r), r["budget_min"], r.get("flags")), []).append(r)
    print("\n| run | budget min | seeds | linear | k-NN | 10-shot |\n| --- | --- | --- | --- | --- | --- |")
    for (name, budget, _), rs in runs.items():
        mean = {k: sum(r.get(k, float("nan")) for r in rs) / len(rs) for k in ("linear", "knn", "10-shot")}
        print(f"| {name} | {budget:g} | {', '.join(str(r['seed']) for r in rs)} | "
              f"{mean['linear']:.2f} | {mean['knn']:.2f} | {mean['10-shot']:.2f} |")


def main(args):
    results = os.path.join(args.out_dir, "results.jsonl")
    if args.table:
        return table(results)
    if args.steps < 0:
        sys.exit(f"error: --steps {args.steps}: steps > 0 (0, the default: calibrate to --budget_min)")
    runs = {}  # spec -> (name, its extra flags, out dir); a spec: NAME or NAME,--flag=value,... (an ablation)
    for spec in args.runs:
        name, *extra = spec.split(",")
        if name not in ("official", "pixels", "random", *RECIPES):
            sys.exit(f"error: unknown run {name!r}: official, pixels, random or one of {sorted(RECIPES)}")
        if extra and name not in RECIPES:
            sys.exit(f"error: {spec!r}: only minimal_vit_inet.py's runs ({sorted(RECIPES)}) take flags")
        # its folder: NAME-TAG-FLAGS-sSEED-BUDGETmin (or STEPSsteps): letters, digits, '.', '_', '-' only
        tag = "".join("-" + x.removeprefix("--") for x in [args.tag, *extra] if x)
        size = f"{args.steps}steps" if args.steps else f"{args.budget_min:g}min"
        out = os.path.join(args.out_dir, re.sub(r"[^\w.-]", "", f"{name}{tag}-s{args.seed}-{size}"))
        if out in [o for *_, o in runs.values()]:  # the same spec twice, or two that name one folder
            sys.exit(f"error: --runs {spec!r} would share {out} with an earlier run (a second seed: --seed)")
        runs[spec] = name, extra, out
    if not os.path.isdir(os.path.join(args.root, "test")):
        if not os.path.exists(args.archive):
            print(f"skipped: {args.archive} not found (CIFAR-10 as JPEGs: train/<class>/*.jpg, test/...)")
            return
        os.makedirs(args.root, exist_ok=True)
        with tarfile.open(args.archive) as tar:
            tar.extractall(args.root, filter="data")
    os.makedirs(args.out_dir, exist_ok=True)
    # every trained run calibrates before any trains, back to back: this VM's speed drifts by a quarter within
    # hours, so runs calibrated apart would split the budget by the hour, not by the recipe
    plans = {}
    for spec, (name, extra, out) in runs.items():
        if name in ("pixels", "random"):
            continue
        if args.steps:  # a fixed length: nothing to calibrate
            plans[spec] = dict(steps=args.steps, spent_s=0.0)
            continue
        t0 = time.perf_counter()
        c = pretrained(name, out, args, extra)
        c["spent_s"] = time.perf_counter() - t0
        plans[spec] = c | dict(steps=steps_left(c["spent_s"], c, args))
        print(f"{spec}: calibration {c['img_s']:.1f} img/s, start-up and end {c['fixed_s']:.0f} s, epoch end "
              f"{c['epoch_s']:.1f} s -> {plans[spec]['steps']} steps", flush=True)
    for spec, (name, extra, out) in runs.items():
        if name == "pixels":
            r = dict(backbone=["--model", "pixels"])
        elif name == "random":
            r = dict(backbone=["--model", args.model, "--seed", str(args.seed)])
        else:
            t0, steps, spent_s = time.perf_counter(), plans[spec]["steps"], plans[spec]["spent_s"]
            r = pretrained(name, out, args, extra, steps)
            r |= dict(img_s=plans[spec].get("img_s", 0.0), pretrain_min=(time.perf_counter() - t0) / 60)
            r["used_min"] = r["pretrain_min"] + spent_s / 60  # calibration + run: the budget, if the plan held
            if not args.steps:  # 20 calibration steps misread a step by 10-20% on this VM: the pace the run kept
                fill = max(10, int(r["steps"] * (args.budget_min * 60 - spent_s) / (r["pretrain_min"] * 60)))
                print(f"{spec}: used {r['used_min']:.1f} of {args.budget_min:g} min; at the pace it ran, --steps "
                      f"{fill} fills it, less the {spent_s:.0f} s calibrated", flush=True)
        r |= probe(os.path.basename(out), r.pop("backbone"), args)
        r |= dict(name=name, tag=" ".join([args.tag, *extra]).strip(), seed=args.seed, budget_min=args.budget_min,
                  model=args.model)
        print(json.dumps(r), flush=True)
        with open(results, "a") as f:
            f.write(json.dumps(r) + "\n")
    table(results)


if __name__ == "__main__":
    main(parse_args())
