"""CPU tests of minimal_vit_inet.py: pieces in-process, training end to end under torchrun (2 procs, gloo).

The data is a small image folder written here (no network, nothing from ../shared)."""
import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import minimal_vit_inet as mvi  # noqa: E402

STEPS_PER_EPOCH, EPOCHS = 10, 2  # 160 train images / global batch 16
TINY = ["--model", "vit_tiny_patch16_224", "--global_size", "32", "--local_size", "16", "--n_global", "2",
        "--n_local", "2", "--proj_hidden", "64", "--proj_dim", "16", "--num_slices", "64", "--batch_size", "16",
        "--warmup_epochs", "0.5", "--workers", "1", "--log_every", "1"]


def write_image_folder(root: Path, per_class: int = 40, classes: int = 4):
    """root/{train,validation}/class{c}/*.jpg: 48x40 noisy JPEGs whose colour depends on the class."""
    rng = np.random.default_rng(0)
    for split, n in [("train", per_class), ("validation", per_class // 4)]:
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((40, 48, 3))
                base[..., c % 3] = 160 + 60 * (c // 3)
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg", quality=85)
    return root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(tmp):
    e = dict(os.environ, HF_DATASETS_CACHE=str(tmp / "hf_cache"), HF_HUB_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    e.pop("RANK", None)
    return e


def torchrun(tmp, data, out, *extra, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", str(EPOCHS), "--out_dir", str(out),
           *TINY, *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def launch_two_nodes(tmp, data, out, epochs, **popen):
    """The README's multi-node command on this machine: two torchrun launchers (the 'nodes', one process
    each) meet through the c10d rendezvous and share out_dir; each writes tmp/node{n}.log (not a pipe)."""
    port, nodes = free_port(), []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=lejepa-test",
               str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", str(epochs),
               "--out_dir", str(out), *TINY]
        with open(tmp / f"node{node}.log", "w") as log:
            nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=env(tmp), stdout=log, stderr=subprocess.STDOUT,
                                          **popen))
    return nodes


def read_metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def losses(records):
    return {r["step"]: r for r in records if "loss" in r}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data):
    """One uninterrupted 2-process run of 20 steps: the reference the other tests compare with."""
    tmp = tmp_path_factory.mktemp("full")
    r = torchrun(tmp, data, tmp / "out")
    return tmp / "out", r.stdout


# ------------------------------------------------------------ 3. the loss

def test_lejepa_loss_against_a_float64_hand_computation():
    """(1 - lambda) * invariance + lambda * SIGReg on a small (V, N, P) tensor, written out element by element in
    float64: the centre of image n is the mean of its 2 global views; the squared distance of every view (the
    globals too) to it, averaged over V * N * P; SIGReg gets every view. lambda = 0.3: swapping lambda and
    1 - lambda, or centring on all views, changes the result."""
    V, N, P, G, lamb = 5, 3, 4, 2, 0.3
    proj = torch.randn(V, N, P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = proj.tolist()
    total = 0.0
    for n in range(N):
        for p in range(P):
            centre = (z[0][n][p] + z[1][n][p]) / 2  # the global views are the first two
            total += sum((z[v][n][p] - centre) ** 2 for v in range(V))
    invariance = total / (V * N * P)
    seen = []

    def sigreg(x):  # a stand-in with a known value: SIGReg itself is tested against float64 in test_sigreg.py
        seen.append(x.detach().clone())
        return torch.tensor(1.75)

    loss, inv, sig = mvi.lejepa_loss(proj, G, sigreg, lamb)
    assert inv.item() == pytest.approx(invariance, rel=1e-6)
    assert sig.item() == 1.75 and len(seen) == 1 and torch.allclose(seen[0].double(), proj)  # every view
    assert loss.item() == pytest.approx((1 - lamb) * invariance + lamb * 1.75, rel=1e-6)
    assert loss.item() != pytest.approx(lamb * invariance + (1 - lamb) * 1.75, rel=1e-3)  # the swap is visible


# ------------------------------------------------------------ 4. optimiser and schedule

def test_lr_schedule_warmup_then_cosine_to_lr_over_1000():
    lr, total, warmup = 5e-4, 1000, 100
    lrs = [mvi.lr_at(s, total, warmup, lr) for s in range(total)]
    assert lrs[warmup - 1] == pytest.approx(lr)  # warm-up ends at the peak
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # linear increase
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then decreasing
    assert lrs[-1] == pytest.approx(lr / 1000, rel=1e-9)  # the last optimiser step really uses lr / 1000
    assert mvi.lr_at(5, 6, 0, 1.0) == pytest.approx(1e-3, rel=1e-9)  # also without warm-up


# ------------------------------------------------------------ 5. the training step (the GPU path, on the CPU)

@pytest.mark.parametrize("bf16", [False, True])
def test_a_training_step_never_waits_on_the_host(tmp_path, data, monkeypatch, bf16):
    """The real step (train_step, then the non-finite flag) on real batches from the real loader: no operation that
    makes a GPU's host wait (read-backs, data-dependent shapes, tensors built from host data) in a step that does
    not log. Under bf16 autocast too (the GPU's precision, run here on the CPU): the loss terms come back fp32."""
    sys.path.insert(0, str(ROOT / "bench"))
    import host_syncs
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cfg = mvi.parse_config(TINY + ["--dataset", str(data), "--out_dir", str(tmp_path), "--bf16", str(bf16)])
    ds = mvi.load_split(cfg.dataset, "train")
    views = mvi.ViewsDataset(ds, "image", "label", mvi.MultiCrop(cfg), cfg.seed)
    batches = mvi.train_batches(cfg, views, 0, 0, 0, 1, 10)  # 1 DataLoader worker
    device = torch.device("cpu")
    model, sigreg, optimizer = mvi.build_training(cfg, 4, device)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    bad, counts = torch.zeros((), dtype=torch.bool, device=device), []
    for step in range(3):
        batch = next(batches)
        with host_syncs.count(device) as syncs:
            terms = mvi.train_step(model, optimizer, sigreg, batch, cfg, autocast, device)
            bad |= ~torch.isfinite(terms).all()  # as main() does
        counts.append(syncs)
    batches.close()  # stops the DataLoader worker now
    assert counts[1] == [] and counts[2] == [], counts  # the first call builds per-device constants
    assert terms.dtype == torch.float32 and torch.isfinite(terms).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never changes the weights
    with host_syncs.count(device) as syncs:  # the counter does see the logging step's read-back
        assert mvi.check_health(cfg, bad, 3) is False and len(terms.tolist()) == 4
    assert len(syncs) == 2, syncs


def test_bf16_run_keeps_checkpoint_and_export_in_fp32(tmp_path, data):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "1",
           "--out_dir", str(out), *TINY, "--workers", "0", "--bf16", "true", "--steps_per_epoch", "3"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| bf16" in r.stdout
    records = read_metrics(out)
    assert all(math.isfinite(rec["loss"]) for rec in records if "loss" in rec) and len(losses(records)) == 3
    assert any(rec.get("probe_acc") is not None for rec in records)  # evaluated under bf16 too
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    tensors = [t for t in ckpt["model"].values() if t.is_floating_point()]
    tensors += [t for state in ckpt["optimizer"]["state"].values() for t in state.values() if t.is_floating_point()]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    from safetensors.torch import load_file
    exported = load_file(out / "export" / "model.safetensors")
    assert exported and all(t.dtype == torch.float32 for t in exported.values() if t.is_floating_point())


def test_compiled_backbone_does_not_recompile_after_the_first_epoch(tmp_path, data, monkeypatch):
    """--compile: the global-size and local-size training calls and the evaluation (another mode, a smaller last
    batch) compile once each during the first epoch, then never again; so does the colour stage, once per view size,
    whatever each batch draws. Counted with a backend that records each graph it is handed (dynamo decides
    recompiles, whatever the backend: inductor would take minutes here)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cfg = mvi.parse_config(TINY + ["--dataset", str(data), "--workers", "0", "--compile", "true"])
    ds, val = mvi.load_split(cfg.dataset, "train"), mvi.load_split(cfg.dataset, "validation")
    views = mvi.ViewsDataset(ds, "image", "label", mvi.MultiCrop(cfg), cfg.seed)
    val_loader = mvi.eval_loader(cfg, val, "image", "label", 0, 1, 12)  # 40 images: batches of 12, 12, 12, 4
    device = torch.device("cpu")
    model, sigreg, optimizer = mvi.build_training(cfg, 4, device)
    graphs, colour_graphs = [], []

    def recording_backend(found):
        def backend(gm, example_inputs):
            found.append([tuple(x.shape) for x in example_inputs if torch.is_tensor(x)])
            return gm.forward
        return backend

    torch._dynamo.reset()
    model.backbone.compile(backend=recording_backend(graphs))
    colour = torch.compile(mvi.colour_augment, fullgraph=True, dynamic=False, backend=recording_backend(colour_graphs))
    monkeypatch.setattr(mvi, "compiled", lambda fn: colour)  # what train_step calls under --compile
    autocast = torch.autocast("cpu", enabled=False)
    per_epoch = []
    for epoch in range(3):
        before = len(graphs) + len(colour_graphs)
        batches = mvi.train_batches(cfg, views, epoch, 0, 0, 1, 3)
        for batch in batches:
            mvi.train_step(model, optimizer, sigreg, batch, cfg, autocast, device)
        assert 0 <= mvi.evaluate_probe(model, val_loader, device, autocast) <= 1
        per_epoch.append(len(graphs) + len(colour_graphs) - before)
    torch._dynamo.reset()
    assert per_epoch[0] >= 4 and per_epoch[1:] == [0, 0], (per_epoch, graphs, colour_graphs)
    assert len(colour_graphs) == 2  # one per view size: 2 x 32 px and 2 x 16 px views of 16 images
    assert len(graphs) < torch._dynamo.config.cache_size_limit  # never falls back to eager (the recompile limit)


def test_ranks_draw_their_own_stochastic_depth():
    """main() seeds every rank alike for the initial weights, then each by (seed, rank): the ranks' drop-path
    masks (and streamed augmentations) differ, and each rank's are reproducible."""
    from timm.layers import DropPath
    drop, x = DropPath(0.5).train(), torch.ones(64, 1, 1)

    def masks(rank):
        mvi.seed_rank(0, rank)
        return drop(x).flatten()

    assert not torch.equal(masks(0), masks(1))
    assert torch.equal(masks(1), masks(1))
    rank0_seed0 = masks(0)
    mvi.seed_rank(1, 0)  # another --seed: other masks
    assert not torch.equal(drop(x).flatten(), rank0_seed0)


class MeanColour(torch.nn.Module):
    """A backbone without weights for probe tests: a view's mean colour and its negative (B, 6)."""
    num_features = 6

    def forward(self, x):
        m = x.mean((2, 3))
        return torch.cat([m, -m], 1)


def test_the_online_probe_learns_each_view_with_its_own_images_label(tmp_path, monkeypatch):
    """train_step's probe labels must line up with the view-major logits (labels.repeat, not repeat_interleave).
    A task the probe can only learn so: 3 classes of pure red, green and blue images, a backbone that gives a
    view's mean colour, 21 real steps (the loader, the colour stage, AdamW). On the validation images, computed
    here, the probe gives the true class a mean probability of 0.96-0.99 over 4 seeds, and 0.39-0.42 with the
    labels misaligned: their top-1 alone would not tell (a misaligned batch still pairs 2 of its 32 rows
    rightly, a weak signal that can win every argmax)."""
    data = write_image_folder(tmp_path / "rgb", classes=3)  # 40 train, 10 validation images per class
    cfg = mvi.parse_config(TINY + ["--dataset", str(data), "--workers", "0", "--probe_lr", "0.05"])
    monkeypatch.setattr(mvi, "build_backbone", lambda *args, **kwargs: MeanColour())
    ds, val = mvi.load_split(cfg.dataset, "train"), mvi.load_split(cfg.dataset, "validation")
    views = mvi.ViewsDataset(ds, "image", "label", mvi.MultiCrop(cfg), cfg.seed)
    device, autocast = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    model, sigreg, optimizer = mvi.build_training(cfg, 3, device)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"]
    for epoch in range(3):
        for batch in mvi.train_batches(cfg, views, epoch, 0, 0, 1, 7):  # 120 images, batch 16: 7 steps
            mvi.train_step(model, optimizer, sigreg, batch, cfg, autocast, device)
    with torch.no_grad():
        p_true = [model.probe(model.backbone(mvi.normalize(mvi.eval_transform(row["image"], size=32)[None])))
                  .softmax(-1)[0, row["label"]].item() for row in val]
    assert len(p_true) == 30 and sum(p_true) / 30 >= 0.8, sum(p_true) / 30
    assert mvi.evaluate_probe(model, mvi.eval_loader(cfg, val, "image", "label", 0, 1, 8), device, autocast) >= 0.9


@pytest.mark.parametrize("compiled", [False, True])
def test_batchnorm_running_statistics_are_the_global_views_alone(compiled):
    """Eval mode (the online probe, the export) reads BatchNorm's running statistics; the local views' small crops
    have other statistics (mixed in, the online probe read 4 to 9 points low at the end of CIFAR-10 and
    Fashion-MNIST runs). A training forward leaves them as a plain call on the global views alone does, not as
    plain calls on each view size do (the old way: this test's failing form), and its output is theirs
    (training is unchanged). Compiled too (dynamo's tracing, no inductor)."""
    torch.manual_seed(0)
    model = mvi.LeJEPA(mvi.build_backbone("resnet18", 32), 64, 16, num_classes=4)
    globals_only, every_size = copy.deepcopy(model), copy.deepcopy(model)
    if compiled:
        model.backbone.compile(backend=lambda gm, example_inputs: gm.forward)
    groups = [torch.randn(2 * 8, 3, 32, 32), 3 * torch.rand(4 * 8, 3, 16, 16)]  # 2 global, 4 local views of 8
    proj, _ = model(groups, 8, 2)
    globals_only.backbone(groups[0])
    expected = every_size.projector(torch.cat([every_size.backbone(x) for x in groups])).unflatten(0, (-1, 8))
    assert torch.allclose(proj, expected, atol=1e-5)
    ours, only, old = (dict(m.backbone.named_buffers()) for m in (model, globals_only, every_size))
    assert ours.keys() == only.keys() and any(k.endswith("running_var") for k in ours)
    assert all(torch.allclose(ours[k].float(), only[k].float(), atol=1e-6) for k in ours)
    assert not torch.allclose(ours["bn1.running_mean"], old["bn1.running_mean"], atol=1e-3)
    assert ours["bn1.num_batches_tracked"] == 1 and old["bn1.num_batches_tracked"] == 2


def probe_model_and_val(folder, rank=0, world=1):
    """A random-init tiny ViT with a probe (seed 0: the same on every rank) and this rank's validation batches."""
    torch.manual_seed(0)
    model = mvi.LeJEPA(mvi.build_backbone("vit_tiny_patch16_224", 32), 64, 16, num_classes=4)
    cfg = mvi.parse_config(TINY + ["--workers", "0"])
    val = mvi.load_split(str(folder), "validation")
    return model, val, mvi.eval_loader(cfg, val, "image", "label", rank, world, batch_size=7)


def probe_rank(rank, port, folder, out):
    """torch.multiprocessing worker: rank's share of the validation images through evaluate_probe, under gloo."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, _, loader = probe_model_and_val(folder, rank, 2)
    acc = mvi.evaluate_probe(model, loader, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    Path(out, f"rank{rank}.json").write_text(json.dumps(dict(acc=acc, images=len(loader.sampler))))
    time.sleep(0.1)  # as close_distributed: gloo's threads finish before the group goes
    dist.destroy_process_group()


def test_online_probe_accuracy_sums_its_counts_over_ranks(tmp_path, data):
    """evaluate_probe on 2 ranks, each half of the validation images, reports the accuracy on all of them: equal to
    one process's on all the images, and to a count made here image by image."""
    import torch.multiprocessing as mp
    model, val, loader = probe_model_and_val(data)  # also prepares the datasets cache the workers then read
    model.eval()
    with torch.no_grad():  # one image at a time, without evaluate_probe: the reference count
        hits = [int(model.probe(model.backbone(mvi.normalize(mvi.eval_transform(row["image"], size=32)[None])))
                    .argmax().item() == row["label"]) for row in val]
    single = mvi.evaluate_probe(model, loader, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert len(hits) == 40 and single == pytest.approx(sum(hits) / 40, rel=1e-6)
    mp.spawn(probe_rank, args=(free_port(), str(data), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["images"] for r in ranks] == [20, 20]  # disjoint halves (eval_loader: images rank, rank + 2, ...)
    assert sum(hits[0::2]) != sum(hits[1::2])  # the halves differ: a rank reporting its own half would show
    assert ranks[0]["acc"] == ranks[1]["acc"] == single, (ranks, single, sum(hits))


# ------------------------------------------------------------ 6. main, end to end: torchrun --nproc_per_node=2

def test_ddp_run_logs_every_step_its_loss_falls_and_its_checkpoint_is_whole(full_run):
    """Rank 0's record of a 2-rank run (that the ranks hold the same weights: the next test)."""
    out, stdout = full_run
    records = read_metrics(out)
    steps = losses(records)
    total = STEPS_PER_EPOCH * EPOCHS
    assert sorted(steps) == list(range(1, total + 1))
    loss = [steps[s]["loss"] for s in sorted(steps)]
    assert all(math.isfinite(v) for v in loss)
    for r in steps.values():  # each line's loss is the mix of its own two terms, lambda = 0.05
        assert r["loss"] == pytest.approx(0.95 * r["invariance"] + 0.05 * r["sigreg"], rel=1e-6, abs=1e-7), r
    assert np.mean(loss[-5:]) < np.mean(loss[:5]), loss  # decreasing (noisy per step: compare means)
    for key in ("invariance", "sigreg", "lr", "images_per_s"):
        assert all(math.isfinite(steps[s][key]) for s in steps)
    assert steps[total]["lr"] == pytest.approx(5e-4 / 1000, rel=1e-9)  # last step at lr / 1000
    assert [r["probe_acc"] for r in records if "probe_acc" in r] and all(
        0 <= r["probe_acc"] <= 1 for r in records if "probe_acc" in r)  # evaluated each epoch
    assert "global batch 16 (8/rank)" in stdout and f"total steps {total}" in stdout
    assert "online probe on 'validation', 4 classes" in stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == total and ckpt["sigreg"] and ckpt["optimizer"]["state"] and ckpt["config"]["lamb"] == 0.05
    assert "warm-up 5 steps (0.5 epochs)" in stdout
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temp file


def test_ddp_keeps_every_ranks_parameters_identical(tmp_path, data):
    """DDP's promise, which the script relies on instead of checking it every run: main() under torchrun, two ranks
    on different images (and stochastic depth), ends with bit-identical parameters and optimiser states. Each rank
    records its batches' labels and, at the last save, what main() hands save_checkpoint."""
    worker = tmp_path / "worker.py"
    worker.write_text("\n".join([
        "import os, sys, torch",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "import minimal_vit_inet as mvi",
        "step, save, labels = mvi.train_step, mvi.save_checkpoint, []",
        "def train_step(model, optimizer, sigreg, batch, *args):",
        "    labels.append(batch[1])",
        "    return step(model, optimizer, sigreg, batch, *args)",
        "def save_checkpoint(cfg, model, optimizer, *args):  # model: the module inside DDP",
        "    state = [torch.cat(labels), dict(model.named_parameters()), optimizer.state_dict()['state']]",
        "    torch.save(state, f\"{sys.argv[-1]}/rank{os.environ['RANK']}.pt\")",
        "    return save(cfg, model, optimizer, *args)",
        "mvi.train_step, mvi.save_checkpoint = train_step, save_checkpoint",
        "mvi.run(mvi.main, mvi.parse_config(sys.argv[1:-1]))"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(worker), "--dataset", str(data), *TINY, "--drop_path", "0.1", "--workers", "0", "--epochs", "1",
           "--steps_per_epoch", "3", "--val_split", "", "--out_dir", str(tmp_path / "out"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    (labels0, params0, adam0), (labels1, params1, adam1) = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(labels0) == len(labels1) == 3 * 8  # 3 steps of 8 images per rank
    assert not torch.equal(labels0, labels1)  # each rank saw its own images (and drew its own stochastic depth)
    assert params0.keys() == params1.keys() and all(torch.equal(params0[k], params1[k]) for k in params0)
    assert len(adam0) == len(params0) and all(torch.equal(adam0[i][k], adam1[i][k]) for i in adam0 for k in adam0[i])


def test_resume_continues_exactly(tmp_path, data, full_run):
    out_full, _ = full_run
    out = tmp_path / "out"
    r = torchrun(tmp_path, data, out, "--stop_after", "7")  # stop mid-epoch 0
    assert "stopped after step 7" in r.stdout
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 7
    r = torchrun(tmp_path, data, out)  # the same command again: resumes
    assert "start step 7" in r.stdout
    ref, resumed = losses(read_metrics(out_full)), losses(read_metrics(out))
    assert sorted(resumed) == sorted(ref)
    for s in ref:  # deterministic CPU run: the resumed losses equal the uninterrupted ones
        assert resumed[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6, abs=1e-7), s
        assert resumed[s]["sigreg"] == pytest.approx(ref[s]["sigreg"], rel=1e-6, abs=1e-7), s


def test_two_nodes_through_torchrun_rendezvous_train_as_one_node(tmp_path, data, full_run):
    """The README's multi-node command on one machine: two torchrun launchers (the 'nodes', one process each)
    meet through the c10d rendezvous and share out_dir, as nodes share a filesystem. World size 2 either way, so
    the losses equal those of the 2-process single-node run."""
    out = tmp_path / "out"
    nodes = launch_two_nodes(tmp_path, data, out, EPOCHS)
    codes = [p.wait(timeout=300) for p in nodes]
    assert codes == [0, 0], [(tmp_path / f"node{n}.log").read_text()[-3000:] for n in range(2)]
    ref, got = losses(read_metrics(full_run[0])), losses(read_metrics(out))
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6, abs=1e-7), s
    logs = "".join((tmp_path / f"node{n}.log").read_text() for n in range(2))
    assert "total steps 20" in logs and (out / "export" / "model.safetensors").exists()


def test_stop_after_at_or_below_the_resumed_step_does_nothing(tmp_path, data, full_run):
    out, _ = full_run  # holds a checkpoint at step 20
    def files():  # all but the lock file, which holds the pid of the latest run to take it
        kept = [f for f in out.iterdir() if f.is_file() and f.name != "lock"]
        return {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in kept}

    before = files()
    cmd = [sys.executable, str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", str(EPOCHS),
           "--out_dir", str(out), *TINY, "--stop_after", "7"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to do" in r.stdout and "step 20" in r.stdout and "--stop_after 7" in r.stdout
    assert files() == before


def test_a_stop_on_an_epoch_end_evaluates_and_a_stop_on_the_last_step_exports(tmp_path, data):
    """--stop_after on an epoch's last step still runs that epoch's probe before it saves; at the run's last
    step it is the end of the run: the probe, the checkpoint and the export, as without the flag."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "2", "--out_dir",
           str(out), *TINY, "--workers", "0", "--steps_per_epoch", "3"]
    r = subprocess.run(cmd + ["--stop_after", "3"], cwd=ROOT, env=env(tmp_path), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0 and "stopped after step 3" in r.stdout, r.stderr[-3000:]
    assert [rec["step"] for rec in read_metrics(out) if "probe_acc" in rec] == [3] and not (out / "export").exists()
    r = subprocess.run(cmd + ["--stop_after", "6"], cwd=ROOT, env=env(tmp_path), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0 and "start step 3" in r.stdout and "stopped after" not in r.stdout, r.stderr[-3000:]
    assert [rec["step"] for rec in read_metrics(out) if "probe_acc" in rec] == [3, 6]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6
    assert "% (online linear probe" in (out / "export" / "README.md").read_text()


def test_sigterm_writes_checkpoint_and_exits(tmp_path, data):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "50", "--out_dir", str(out), *TINY]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:  # wait until training is under way
        if (out / "metrics.jsonl").exists() and len(losses(read_metrics(out))) >= 2:
            break
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers, as a cluster scheduler would
    stdout, _ = p.communicate(timeout=180)
    assert "(SIGTERM)" in stdout, stdout[-3000:]
    step = torch.load(out / "ckpt.pt", weights_only=False)["step"]
    assert 2 <= step < 50 * STEPS_PER_EPOCH and f"stopped after step {step}" in stdout


def test_nonfinite_loss_stops_with_message_and_keeps_checkpoint(tmp_path, data):
    # lr 1e30: AdamW's first update makes the weights ~1e30, so the second step's loss overflows to nan
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "1",
           "--out_dir", str(out), *TINY, "--workers", "0", "--warmup_epochs", "0", "--lr", "1e30", "--save_every", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    assert "error: non-finite loss by step 2" in r.stderr, r.stderr[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 1 and "(step 1)" in r.stderr
    assert not list(out.glob("*.tmp")) and not (out / "export").exists()


def test_a_nan_gradient_never_reaches_the_checkpoint(tmp_path, data):
    """An overflow in a backward pass: step 6's gradients turn NaN while its loss stays finite, and the save after
    step 6 is due. The weights are checked before every save: the run ends in one line that names the step and the
    last good checkpoint, which stays on disk, finite (it used to be overwritten by NaN weights)."""
    out = tmp_path / "out"
    code = "\n".join([
        "import sys, torch",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "import minimal_vit_inet as mvi",
        "step, calls = torch.optim.AdamW.step, []",
        "def nan_step(self, *args, **kwargs):",
        "    calls.append(1)",
        "    if len(calls) == 6:",
        "        for group in self.param_groups:",
        "            for p in group['params']:",
        "                p.grad.fill_(float('nan'))",
        "    return step(self, *args, **kwargs)",
        "torch.optim.AdamW.step = nan_step",
        "mvi.run(mvi.main, mvi.parse_config(sys.argv[1:]))"])
    cmd = [sys.executable, "-c", code, "--dataset", str(data), "--epochs", "1", "--out_dir", str(out), *TINY,
           "--workers", "0", "--save_every", "3", "--log_every", "100"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    line = r.stderr.strip().splitlines()[-1]
    assert line == f"error: non-finite weights by step 6; stopped, the last good checkpoint is {out}/ckpt.pt (step 3)", \
        r.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert [rec["step"] for rec in read_metrics(out) if "loss" in rec] == [1]  # the first step, then no log step


def test_a_nonfinite_loss_on_one_rank_stops_both_ranks_alike(tmp_path, data):
    """Two ranks under torchrun; at step 6 only rank 1's logged invariance turns NaN (its gradients, and so every
    weight, stay finite: no other check can see it). The save after step 6 is due; the all-reduce in the health
    check must stop rank 0 too: both ranks end with the same one line, and the checkpoint of step 3 stays."""
    out, wrapper = tmp_path / "out", tmp_path / "nan_on_rank1.py"
    wrapper.write_text("\n".join([
        "import os, sys, torch",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "import minimal_vit_inet as mvi",
        "loss, calls = mvi.lejepa_loss, []",
        "def nan_on_rank1(*args):",
        "    total, inv, sig = loss(*args)",
        "    calls.append(1)",
        "    if os.environ['RANK'] == '1' and len(calls) == 6:",
        "        inv = inv.detach() * float('nan')  # what is logged; the loss and its gradient stay finite",
        "    return total, inv, sig",
        "mvi.lejepa_loss = nan_on_rank1",
        "mvi.run(mvi.main, mvi.parse_config(sys.argv[1:]))"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(wrapper), "--dataset", str(data), "--epochs", "1", "--out_dir", str(out), *TINY, "--workers", "0",
           "--save_every", "3", "--log_every", "100", "--val_split", ""]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    line = f"error: non-finite loss by step 6; stopped, the last good checkpoint is {out}/ckpt.pt (step 3)"
    assert [x for x in r.stderr.splitlines() if x.startswith("error:")] == [line, line], r.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert not list(out.glob("*.tmp")) and not (out / "export").exists()


# ------------------------------------------------------------ plumbing: the command line

def test_bad_arguments_fail_fast_with_one_line():
    for argv, word in [(["--batch_size", "0"], "batch_size"), (["--lamb", "1.5"], "lamb"),
                       (["--model", "vit_no_such_model"], "unknown timm model"),
                       (["--global_size", "0"], "--global_size must be > 0"),
                       (["--num_slices", "0"], "--num_slices must be > 0"),
                       (["--workers", "-1"], "--workers must be >= 0"),
                       (["--local_scale", "0.5", "0.2"], "crop scales"),
                       (["--dataset", "/no/such/folder"], "no such folder"),
                       (["--dataset", "./relative/missing"], "no such folder"),
                       (["--epochs", "5", "--warmup_epochs", "10"], "--warmup_epochs 10.0 is not shorter than --epochs 5"),
                       (["--model", "vit_small_patch16_224"], "must be multiples of 16, e.g. 224 and 96")]:
        with pytest.raises(SystemExit) as e:
            mvi.parse_config(argv)
        assert word in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))
    assert mvi.parse_config(["--dataset", "frgfm/imagenette"]).dataset == "frgfm/imagenette"  # a hub id is no path
    cfg = mvi.parse_config(["--global_scale", "0.4", "0.9", "--bf16", "false", "--lr", "1e-3"])
    assert cfg.global_scale == (0.4, 0.9) and cfg.bf16 is False and cfg.lr == 1e-3


def test_a_mistyped_boolean_flag_is_refused(capsys):
    """--compile on / ture would otherwise be read as false, silently."""
    for word in ("on", "ture"):
        with pytest.raises(SystemExit):
            mvi.parse_config(["--compile", word])
        assert f"invalid flag value: '{word}'" in capsys.readouterr().err
    assert mvi.parse_config(["--compile", "TRUE", "--bf16", "0"]).compile is True


def test_a_short_run_gets_a_warm_up_of_a_tenth_of_it():
    """The default warm-up is 10 epochs (DINO's), capped at a tenth of the run: a new user's --epochs 2 runs."""
    assert mvi.parse_config(["--epochs", "2"]).warmup_epochs == pytest.approx(0.2)
    assert mvi.parse_config([]).warmup_epochs == 10.0  # the official recipe's 100 epochs
    assert mvi.parse_config(["--epochs", "2", "--warmup_epochs", "1.5"]).warmup_epochs == 1.5  # as asked


def test_patch_size_of_timm_families():
    """Read from the model built on the meta device: a tuple, an int (XCiT), none (convnets, CrossViT's list of
    two embeddings, MViTv2): 1 when it cannot be told, so the check never refuses a model that could run."""
    sizes = {name: mvi.patch_size(name, {}) for name in ("vit_large_patch14_224", "deit_small_patch16_224",
                                                         "xcit_nano_12_p16_224", "resnet18", "crossvit_tiny_240",
                                                         "mvitv2_tiny")}
    assert sizes == {"vit_large_patch14_224": 14, "deit_small_patch16_224": 16, "xcit_nano_12_p16_224": 16,
                     "resnet18": 1, "crossvit_tiny_240": 1, "mvitv2_tiny": 1}


def test_the_commands_in_the_docstring_and_the_readme_parse():
    """Every minimal_vit_inet.py command shown to users (the docstring, README.md, docs/) passes parse_config
    (their folders do not exist here)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = (mvi.__doc__ + "".join(page.read_text() for page in pages)).replace("\\\n", " ")
    commands = [line.split("minimal_vit_inet.py", 1)[1].split("#")[0].split() for line in text.splitlines()
                if "minimal_vit_inet.py --" in line and "--export" not in line]
    assert len(commands) >= 5, commands
    for argv in commands:
        if "--dataset" in argv and not argv[argv.index("--dataset") + 1].count("/") == 1:  # a local folder
            del argv[argv.index("--dataset"):argv.index("--dataset") + 2]
        mvi.parse_config(argv)  # a SystemExit here names the command's problem


def test_a_missing_mirror_package_is_named_in_one_line(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    def find_spec(name, *args):  # as on a machine without wandb
        return None if name == "wandb" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SystemExit) as e:
        mvi.parse_config(["--wandb", "proj"])
    assert "pip install wandb" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------ plumbing: data

def test_load_split_and_find_columns(tmp_path, data, monkeypatch):
    import datasets
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    globs = []  # datasets resolves a folder's files by globbing (30 s for CIFAR-10's 60,000): once a run
    monkeypatch.setattr(datasets.data_files, "resolve_pattern", lambda *a, _f=datasets.data_files.resolve_pattern,
                        **k: globs.append(a) or _f(*a, **k))
    mvi.load_builder.cache_clear()
    train = mvi.load_split(str(data), "train")  # imagefolder builder
    assert len(train) == 160 and mvi.find_columns(train) == ("image", "label") and globs
    globs.clear()
    assert len(mvi.load_split(str(data), "validation")) > 0 and not globs  # the second split: no glob
    assert mvi.count_classes(train, "label") == 4
    assert mvi.load_split(str(data), "no_such_split", missing_ok=True) is None
    datasets.DatasetDict(train=train.select(range(8))).save_to_disk(str(tmp_path / "saved"))
    saved = mvi.load_split(str(tmp_path / "saved"), "train")  # load_from_disk
    assert len(saved) == 8 and mvi.find_columns(saved) == ("image", "label")
    # one saved split (no DatasetDict) answers to "train" and to its own name; others are missing
    mvi.load_split(str(data), "train[:5%]").save_to_disk(str(tmp_path / "one"))  # 8 of the 160 images
    assert len(mvi.load_split(str(tmp_path / "one"), "train")) == 8
    assert len(mvi.load_split(str(tmp_path / "one"), "train[:5%]")) == 8
    assert mvi.load_split(str(tmp_path / "one"), "validation", missing_ok=True) is None
    with pytest.raises(SystemExit) as e:
        mvi.load_split(str(tmp_path / "one"), "holdout")
    assert "no split 'holdout'" in str(e.value)
    # no Image/ClassLabel features: common names (CIFAR-100 style, ImageNet-wds style), or flags
    img = Image.new("RGB", (8, 8))
    cifar = datasets.Dataset.from_dict({"img": [img], "fine_label": [3], "coarse_label": [1]})
    wds = datasets.Dataset.from_dict({"__key__": ["a"], "jpg": [img], "cls": [7]})
    assert mvi.find_columns(cifar)[1] == "fine_label" and mvi.find_columns(wds) == ("jpg", "cls")
    assert mvi.find_columns(cifar, label_column="coarse_label") == ("img", "coarse_label")
    assert mvi.count_classes(wds, "cls") == 8


def test_spearman_of_the_informative_loss_view():
    sys.path.insert(0, str(ROOT / "bench"))
    import plot_run
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=12), rng.normal(size=12)  # no ties: the textbook formula 1 - 6 sum d^2 / (n (n^2 - 1))
    d = np.argsort(np.argsort(a)) - np.argsort(np.argsort(b))
    assert plot_run.spearman(a, b) == pytest.approx(1 - 6 * (d ** 2).sum() / (12 * (12 ** 2 - 1)), abs=1e-12)
    assert plot_run.spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)  # a monotone decrease
    assert plot_run.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties get their mean rank


def test_plot_of_a_run(tmp_path, full_run):
    out, _ = full_run
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "plot_run.py"), str(out), "--out", str(tmp_path / "run.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    png = (tmp_path / "run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 200_000


# ------------------------------------------------------------ plumbing: export

def test_exported_backbone_loads_in_timm_with_training_features(full_run):
    import timm
    out, _ = full_run
    trained = mvi.build_backbone("vit_tiny_patch16_224", 32).eval()  # as built in training, final weights
    state = torch.load(out / "ckpt.pt", weights_only=False)["model"]
    trained.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # timm's Hugging Face format, written with timm's helper: one line loads weights and their config
    export = out / "export"
    assert {"config.json", "model.safetensors", "README.md"} <= {f.name for f in export.iterdir()}
    hub = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    data_cfg = timm.data.resolve_data_config({}, model=hub)
    assert tuple(data_cfg["input_size"]) == (3, 32, 32) and tuple(data_cfg["mean"]) == mvi.IMAGENET_MEAN
    assert data_cfg["interpolation"] == "bicubic" and data_cfg["crop_pct"] == 0.875  # as eval_transform
    with torch.no_grad():
        assert torch.equal(hub(x), trained(x)) and hub(x[:, :, :16, :16]).shape == (3, 192)
    card = (export / "README.md").read_text()
    assert "vit_tiny_patch16_224" in card and "20 steps" in card and "top-1" in card
