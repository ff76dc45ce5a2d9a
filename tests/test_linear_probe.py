"""CPU tests of linear_probe.py on data written here (no network, nothing from ../shared).

The data is test_pretrain's image folder: 4 classes told apart by colour, 40 train / 10 validation per class."""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import linear_probe as lp  # noqa: E402
import minimal_vit_inet as mvi  # noqa: E402
from test_pretrain import TINY, env, free_port  # noqa: E402

FAST = ["--epochs", "20", "--min_steps", "100", "--workers", "0", "--batch_size", "64"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """A tiny single-process pretraining run (10 steps): ckpt.pt and export/ to probe."""
    tmp = tmp_path_factory.mktemp("pretrain")
    cmd = [sys.executable, str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "1",
           "--out_dir", str(tmp / "out"), *TINY, "--workers", "0", "--val_split", ""]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return tmp / "out"


def probe(*argv):
    return lp.main(lp.parse_config([str(a) for a in argv]))


def cached(out_dir, role, dataset="*"):
    (path,) = (Path(out_dir) / "features").glob(f"{dataset}-{role}-*.pt")
    return torch.load(path, weights_only=True), path


# ---------------------------------------------------------------- evaluation pieces

def test_sample_shots_exactly_k_per_class_and_reproducible():
    labels = torch.arange(5).repeat_interleave(torch.tensor([30, 30, 30, 30, 3]))  # class 4 has only 3 images
    for k in (1, 10):
        idx = lp.sample_shots(labels, k, seed=0)
        counts = torch.bincount(labels[idx], minlength=5).tolist()
        assert counts == [k] * 4 + [min(k, 3)]
        assert len(set(idx.tolist())) == len(idx)  # no image twice
        assert torch.equal(idx, lp.sample_shots(labels, k, seed=0))  # same seed, same draw
    assert not torch.equal(lp.sample_shots(labels, 10, 0), lp.sample_shots(labels, 10, 1))  # draws differ


def test_table_rows_columns_and_average():
    def entry(acc, n_draws):
        return dict(linear=acc, linear_std=1.0, knn=acc / 2, knn_std=0.5, draws=[{}] * n_draws)
    results = {"dtd": {"1": entry(30.0, 3), "10": entry(60.0, 3), "all": entry(80.0, 1)},
               "cifar10": {"1": entry(50.0, 3), "10": entry(85.0, 3), "all": entry(96.0, 1)}}
    lines = lp.format_table(results).splitlines()
    assert lines[0] == "| shots | dtd | cifar10 | avg |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| 1", "| 10", "| all"]
    assert lines[2] == "| 1 | 30.00 ± 1.00 | 50.00 ± 1.00 | 40.00 |"  # k-shot cells: mean ± spread over draws
    assert lines[4] == "| all | 80.00 | 96.00 | 88.00 |"
    assert lp.format_table(results, "knn").splitlines()[3] == "| 10 | 30.00 ± 0.50 | 42.50 ± 0.50 | 36.25 |"


def test_linear_head_and_knn_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 3
    y, y_val = torch.arange(5).repeat(40), torch.arange(5).repeat(20)
    x, x_val = centres[y] + torch.randn(200, 32, generator=g), centres[y_val] + torch.randn(100, 32, generator=g)
    cfg = lp.Config(min_steps=200)
    assert lp.train_head(x, y, x_val, y_val, 5, cfg, 0, torch.device("cpu")) >= 95
    assert lp.knn_accuracy(x, y, x_val, y_val, 5, 20, 0.07, torch.device("cpu")) >= 95


def test_knn_votes_with_k_neighbours_weighted_by_exp_cosine_over_t():
    """Six training features around the query direction e1, by cosine: class 0 at 0.9, class 1 twice at 0.8, class
    2 three times at 0.5 (lengths differ: only the angle counts). Six queries along e1 (labels 0, 1, 1, 2, 2, 2), so
    the accuracy names the class voted: 0 -> 100/6 %, 1 -> 200/6, 2 -> 300/6. By hand, weights exp(cos / T):
    k=1: class 0. k=3, T=0.07: e^(0.9/0.07) = 3.8e5 > 2 e^(0.8/0.07) = 1.8e5: class 0. k=3, T=1: e^0.9 = 2.46 <
    2 e^0.8 = 4.45: class 1. k=6, T=1: 3 e^0.5 = 4.95 > 4.45 > 2.46: class 2; at T=0.07 class 0 again. k=20 (more
    than the 6 features): as k=6."""
    r = math.sqrt(1 - 0.8 ** 2)
    s5 = math.sqrt(1 - 0.5 ** 2)
    x = torch.tensor([[0.9, math.sqrt(1 - 0.81), 0], [0.8, r, 0], [0.8, 0, r], [0.5, s5, 0], [0.5, 0, s5],
                      [0.5, -s5, 0]], dtype=torch.float64) * torch.tensor([[1.0], [3.0], [0.5], [2.0], [7.0], [0.1]])
    y = torch.tensor([0, 1, 1, 2, 2, 2])
    x_val, y_val = torch.tensor([[2.0, 0, 0]]).repeat(6, 1), torch.tensor([0, 1, 1, 2, 2, 2])
    cpu = torch.device("cpu")
    for k, t, voted in [(1, 0.07, 0), (3, 0.07, 0), (3, 1.0, 1), (6, 1.0, 2), (6, 0.07, 0), (20, 1.0, 2)]:
        acc = lp.knn_accuracy(x, y, x_val, y_val, 3, k, t, cpu)
        assert acc == pytest.approx(100 * (voted + 1) / 6), (k, t, acc)


# ---------------------------------------------------------------- whole runs on an image folder

def test_colour_task_reaches_90_and_features_are_cached_once(tmp_path, data, monkeypatch, capsys):
    out = tmp_path / "probe"
    common = ["--dataset", data, "--out_dir", out, "--global_size", 16, *FAST]
    results = probe("--model", "pixels", "--shots", "5", "all", *common)
    r = results[str(data)]
    assert r["all"]["linear"] >= 90 and r["all"]["knn"] >= 90, r  # class = colour: separable from pixels
    assert [d["n_train"] for d in r["5"]["draws"]] == [20, 20, 20]  # 5 per class x 4 classes, 3 draws
    train, train_path = cached(out, "train")
    val, _ = cached(out, "val")
    assert train["features"].shape == (160, 3 * 16 * 16) and train["labels"].shape == (160,)
    assert val["features"].shape == (40, 768) and sorted(set(val["labels"].tolist())) == [0, 1, 2, 3]
    assert "extracted" in capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    assert report["results"][str(data)]["all"]["linear"] == r["all"]["linear"]
    assert "| shots | " in (out / "table.md").read_text()

    # a second run with other head settings reads the cache: no loader is even built
    mtime = train_path.stat().st_mtime_ns
    monkeypatch.setattr(mvi, "eval_loader", lambda *a, **k: pytest.fail("features extracted a second time"))
    again = probe("--model", "pixels", "--shots", "all", "--lr", "3e-3", *common)
    assert "from the cache" in capsys.readouterr().out and train_path.stat().st_mtime_ns == mtime
    assert again[str(data)]["all"]["linear"] >= 90


def test_exact_accuracies_on_the_validation_split_of_a_folder(tmp_path):
    """Solid red, green and blue images: 6 per class in train/; validation/ holds 8, two of them blue images in the
    red folder (class 0: red, red, blue, blue; class 1: 3 green; class 2: blue). A head and a k-NN fitted on the
    training split tell the colours apart and score exactly 6 / 8 on the validation split; evaluated on the
    training split they would score 100, and a head fitted on the validation split would call blue class 0: 7 / 8."""
    from PIL import Image
    rgb = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]
    layout = {"train": [[0] * 6, [1] * 6, [2] * 6], "validation": [[0, 0, 2, 2], [1, 1, 1], [2]]}
    for split, classes in layout.items():
        for c, colours in enumerate(classes):
            (tmp_path / "rgb" / split / f"class{c}").mkdir(parents=True)
            for i, colour in enumerate(colours):
                Image.new("RGB", (12, 10), rgb[colour]).save(tmp_path / "rgb" / split / f"class{c}" / f"{i}.png")
    r = probe("--model", "pixels", "--global_size", 8, "--dataset", tmp_path / "rgb", "--out_dir", tmp_path / "p",
              "--shots", "all", "--knn_k", 5, *FAST)[str(tmp_path / "rgb")]
    assert r["all"]["linear"] == 75.0 and r["all"]["knn"] == 75.0, r


def test_random_init_timm_vit_last_two_cls_tokens(tmp_path, data):
    results = probe("--model", "vit_tiny_patch16_224", "--global_size", 32, "--dataset", data,
                    "--out_dir", tmp_path, "--shots", "all", *FAST)
    assert math.isfinite(results[str(data)]["all"]["linear"]) and math.isfinite(results[str(data)]["all"]["knn"])
    train, _ = cached(tmp_path, "train")
    assert train["features"].shape == (160, 2 * 192)  # CLS of the last 2 blocks, concatenated


def test_probe_pretraining_checkpoint_and_exported_backbone(tmp_path, data, run):
    r = probe("--checkpoint", run / "ckpt.pt", "--dataset", data, "--out_dir", tmp_path / "a", "--shots", "2", "all",
              "--draws", "2", *FAST)[str(data)]
    assert all(math.isfinite(r[s][m]) for s in ("2", "all") for m in ("linear", "knn", "linear_std"))
    feats, _ = cached(tmp_path / "a", "train")
    assert feats["features"].shape == (160, 384)  # vit_tiny at the run's 32 px, read from the checkpoint
    r3 = probe("--checkpoint", run / "export", "--dataset", data, "--out_dir", tmp_path / "c", "--shots", "all",
               *FAST)[str(data)]  # the hub-format export folder (also: --model local-dir:... or hf-hub:...)
    assert torch.allclose(cached(tmp_path / "c", "train")[0]["features"].float(), feats["features"].float())
    assert r3["all"]["linear"] == r["all"]["linear"]  # same weights, same features, same head


def test_timm_weights_at_another_size_and_vits_without_prefix_intermediates(tmp_path, data):
    """Hugging Face format weights saved without dynamic_img_size (as timm's own) probe at another size; a ViT
    whose forward_intermediates cannot return the CLS token (PiT) gets its own pooled output."""
    import timm
    folder = tmp_path / "plain_vit"
    timm.models.save_for_hf(timm.create_model("vit_tiny_patch16_224", num_classes=0), str(folder))
    r = probe("--checkpoint", folder, "--global_size", 32, "--dataset", data, "--out_dir", tmp_path / "p",
              "--shots", "all", *FAST)[str(data)]
    assert math.isfinite(r["all"]["linear"]) and cached(tmp_path / "p", "train")[0]["features"].shape == (160, 384)
    pit = timm.create_model("pit_ti_224", num_classes=0).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert not lp.has_cls_intermediates(pit) and torch.equal(lp.embed(pit, x), pit(x))
    assert lp.has_cls_intermediates(timm.create_model("vit_tiny_patch16_224"))


def test_cache_key_holds_what_the_features_depend_on(tmp_path, monkeypatch):
    """Extraction precision and the transfer table's row change the features: another file, never a stale one."""
    cfg = lp.parse_config(["--model", "pixels", "--out_dir", str(tmp_path)])
    def path(**changes):
        return lp.cache_path(dataclasses.replace(cfg, **changes), "pixels", "dtd", "train", (0.5,) * 3, (0.2,) * 3)[0]
    base = path()
    assert path() == base and path(bf16=not cfg.bf16) != base and path(lr=1.0) == base
    monkeypatch.setitem(lp.TRANSFER, "dtd", ("mcimpoi/dtd_split_1", "train", "test", "label", None))  # split 1 only
    assert path() != base


def test_torchrun_splits_extraction_and_gathers_in_order(tmp_path, data):
    """2 ranks against 1 process. Collectives time out after 3 s here, and rank 0 spends 5 s more on the first
    dataset's heads (probe_short_timeout.py): the run passes only if no rank waits in a collective meanwhile."""
    datasets.load_dataset("imagefolder", data_dir=str(data)).save_to_disk(str(tmp_path / "saved"))  # a 2nd dataset
    common = ["--model", "vit_tiny_patch16_224", "--global_size", "32", "--dataset", str(data), str(tmp_path / "saved"),
              "--shots", "all", *FAST]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "tests" / "probe_short_timeout.py"), "--out_dir", str(tmp_path / "ddp"), *common]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    probe("--out_dir", tmp_path / "single", *common)
    for role in ("train", "val"):
        ddp, single = cached(tmp_path / "ddp", role, "imgs*")[0], cached(tmp_path / "single", role, "imgs*")[0]
        assert torch.equal(ddp["labels"], single["labels"])  # rank shares put back in dataset order
        assert torch.allclose(ddp["features"].float(), single["features"].float(), atol=1e-2)
        assert ddp["features"].dtype == single["features"].dtype == torch.float16  # gathered in fp16


# ---------------------------------------------------------------- bad input: one clear line

def test_checkpoint_that_does_not_match_the_model(tmp_path, data, run):
    for model in ("vit_small_patch16_224", "resnet18"):  # other widths; another architecture
        with pytest.raises(SystemExit) as e:
            probe("--checkpoint", run / "ckpt.pt", "--model", model, "--dataset", data, "--out_dir", tmp_path)
        assert "does not match model" in str(e.value) and "\n" not in str(e.value)


def test_dataset_without_labels(tmp_path, data):
    train = mvi.load_split(str(data), "train").remove_columns("label").select(range(8))
    datasets.DatasetDict(train=train, validation=train).save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(SystemExit) as e:
        probe("--model", "pixels", "--global_size", 16, "--dataset", tmp_path / "unlabelled", "--out_dir", tmp_path, *FAST)
    assert "no label column" in str(e.value)


def test_unknown_short_name_and_bad_shots():
    with pytest.raises(SystemExit) as e:
        lp.parse_config(["--model", "pixels", "--dataset", "cifar11"])
    assert "unknown dataset 'cifar11'" in str(e.value) and "cifar10" in str(e.value)
    with pytest.raises(SystemExit) as e:
        lp.parse_config(["--model", "pixels", "--shots", "ten"])
    assert "--shots" in str(e.value)
    for argv, words in ((["--model", "pixels", "--draws", "0"], "--draws must be >= 1"),
                        (["--model", "vit_no_such_model"], "unknown timm model 'vit_no_such_model'"),
                        (["--model", "pixels", "--pretrained", "true"], "does not go with"),
                        (["--checkpoint", "ckpt.pt", "--pretrained", "true"], "does not go with")):
        with pytest.raises(SystemExit) as e:
            lp.parse_config(argv)
        assert words in str(e.value) and "\n" not in str(e.value)
    cfg = lp.parse_config(["--model", "pixels", "--dataset", "transfer", "--shots", "1", "10", "all"])
    assert cfg.dataset == tuple(lp.TRANSFER) and cfg.shots == (1, 10, "all")
