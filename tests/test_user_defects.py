"""What a new user trips on (issue #23), each checked against what the user should see: a full disk while a
checkpoint is written, a probe given both an export and a checkpoint, `~` in paths, a W&B run resumed after
a crash, the log of a batch job (stdout not a terminal), and a hub dataset downloaded to a folder (parquet)."""
import dataclasses
import fcntl
import json
import os
import pty
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_linear_probe import FAST, cached, probe  # noqa: E402
from test_pretrain import ROOT, TINY, env, free_port, read_metrics  # noqa: E402

import minimal_vit_inet as mvi  # noqa: E402


def pretrain(tmp, data, out, *extra, nproc=1, file_limit=0, stdout=subprocess.PIPE, e=None):
    """One epoch of 10 steps (160 images, batch 16) of the tiny model; under torchrun when nproc > 1. With
    file_limit, no process of the job may write a file larger than that many bytes: a full disk."""
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), str(ROOT / "minimal_vit_inet.py"), "--dataset",
           str(data), "--epochs", "1", "--out_dir", str(out), *TINY, "--workers", "0", *extra]

    def small_disk():  # in the child, inherited by the ranks: a write past the limit fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (not the signal that would kill the writer)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run(cmd, cwd=ROOT, env=e or env(tmp), stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=300, preexec_fn=small_disk if file_limit else None)


# ---------------------------------------------------------------- 1. a full disk while a checkpoint is written

def test_a_full_disk_mid_checkpoint_ends_every_rank_in_one_line_and_the_last_checkpoint_resumes(tmp_path, data):
    out = tmp_path / "out"
    r = pretrain(tmp_path, data, out, "--stop_after", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    whole = (out / "ckpt.pt").read_bytes()
    assert len(whole) > 8_000_000  # the model and AdamW's state: more than the "disk" below has room for
    r = pretrain(tmp_path, data, out, "--save_every", "3", nproc=2, file_limit=4_000_000)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and lines[0] == lines[1], r.stderr[-3000:]  # rank 0 and rank 1, alike
    assert str(out / "ckpt.pt") in lines[0] and "File too large" in lines[0] and "step 2" in lines[0]
    assert "inline_container" not in r.stderr and "Traceback" not in r.stderr.split("error:")[0]
    assert not (out / "ckpt.pt.tmp").exists()  # the partial file does not stay on the full disk
    assert (out / "ckpt.pt").read_bytes() == whole
    r = pretrain(tmp_path, data, out, "--stop_after", "5")  # room again: it resumes from step 2
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 5
    assert [rec["step"] for rec in read_metrics(out) if "loss" in rec] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- 2. the probe given an export and a checkpoint

def test_the_probe_given_an_export_and_a_checkpoint_probes_the_checkpoint_and_says_so(tmp_path, data, capsys):
    cfg = mvi.parse_config(TINY + ["--out_dir", str(tmp_path)])
    torch.manual_seed(1)
    model = mvi.LeJEPA(mvi.build_backbone(cfg.model, cfg.global_size), cfg.proj_hidden, cfg.proj_dim)
    mvi.write_atomic(dict(model=model.state_dict(), step=5, config=dataclasses.asdict(cfg)), str(tmp_path / "ckpt.pt"))
    torch.manual_seed(2)  # the export holds other weights
    mvi.export_for_hub(mvi.build_backbone(cfg.model, cfg.global_size), cfg, 5, str(tmp_path / "export"))
    common = ["--dataset", data, "--shots", "all", *FAST]
    probe("--model", f"local-dir:{tmp_path / 'export'}", "--checkpoint", tmp_path / "ckpt.pt",
          "--out_dir", tmp_path / "both", *common)
    said = [line for line in capsys.readouterr().out.splitlines() if "--checkpoint" in line]
    assert len(said) == 1 and f"probing --checkpoint {tmp_path / 'ckpt.pt'}" in said[0]
    probe("--checkpoint", tmp_path / "ckpt.pt", "--out_dir", tmp_path / "alone", *common)
    both, alone = cached(tmp_path / "both", "train")[0], cached(tmp_path / "alone", "train")[0]
    assert torch.equal(both["features"], alone["features"])  # the checkpoint's weights, as without --model


# ---------------------------------------------------------------- 3. ~ in paths

def test_a_tilde_in_a_path_is_the_home_folder_in_both_scripts(tmp_path, data, monkeypatch):
    monkeypatch.setenv("HOME", str(data.parent))  # ~ is $HOME, as in a shell
    home = f"~/{data.name}"
    cfg = mvi.parse_config(TINY + ["--dataset", home, "--out_dir", "~/out"])
    assert (cfg.dataset, cfg.out_dir) == (str(data), str(data.parent / "out"))
    results = probe("--model", "pixels", "--global_size", 16, "--dataset", home, "--out_dir", "~/probe", *FAST)
    assert list(results) == [str(data)] and (data.parent / "probe" / "results.json").exists()
    import linear_probe as lp
    assert lp.parse_config(["--checkpoint", "~/run/ckpt.pt"]).checkpoint == str(data.parent / "run" / "ckpt.pt")


# ---------------------------------------------------------------- 4. a W&B run resumed after a crash

def wandb_records(path: Path):
    """The records of an offline run file (run-ID.wandb): a 7-byte header, then LevelDB-log blocks of 32 KiB
    holding (checksum, length, type) + data chunks; type 1 is a whole record, 2, 3, 4 its first, middle, last."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw, pos, chunk = path.read_bytes(), 7, b""
    while pos + 7 <= len(raw):
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if pos % 32768 > 32768 - 7 or (kind == 0 and n == 0):  # a block's zero-filled tail
            pos += 32768 - pos % 32768
            continue
        chunk, pos = chunk + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            yield pb.Record.FromString(chunk)
            chunk = b""


def wandb_shows(out: Path) -> dict:
    """{step: logged values} as W&B shows the run once its offline sessions are synced, in order: a session
    that rewinds (resume_from) cuts the history after its step; otherwise W&B refuses a step that is not
    above the run's last one."""
    shown = {}
    sessions = sorted(out.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime_ns)
    for path in sessions:
        last = max(shown, default=-1)
        for rec in wandb_records(path):
            if rec.HasField("run") and rec.run.HasField("branch_point"):
                last = rec.run.branch_point.value
                shown = {s: v for s, v in shown.items() if s <= last}
            if rec.HasField("history"):
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                if rec.history.step.num > last:
                    shown.setdefault(rec.history.step.num, {}).update(items)
    return shown


def test_a_resumed_wandb_run_shows_what_metrics_jsonl_holds(tmp_path, data):
    pytest.importorskip("wandb", reason="wandb is not installed: the --wandb mirror is optional")
    out, e = tmp_path / "out", dict(env(tmp_path), WANDB_MODE="offline", WANDB_SILENT="true")
    for extra in (["--stop_after", "2"], ["--stop_after", "4"]):
        r = pretrain(tmp_path, data, out, "--wandb", "lejepa-test", "--steps_per_epoch", "6", *extra, e=e)
        assert r.returncode == 0, r.stderr[-3000:]
        if extra[1] == "2":
            shutil.copy(out / "ckpt.pt", tmp_path / "ckpt2.pt")
    # a crash after step 4 was logged, before its checkpoint: the checkpoint on disk is step 2's
    shutil.copy(tmp_path / "ckpt2.pt", out / "ckpt.pt")
    r = pretrain(tmp_path, data, out, "--wandb", "lejepa-test", "--steps_per_epoch", "6", "--log_every", "3", e=e)
    assert r.returncode == 0, r.stderr[-3000:]
    jsonl = {}
    for rec in read_metrics(out):  # steps 1, 2 of the first session; 3 (the first after the resume) and 6
        jsonl.setdefault(rec["step"], {}).update(rec)
    assert sorted(jsonl) == [1, 2, 3, 6]
    run_id = (out / "wandb_id").read_text()  # the three sessions are one W&B run, synced later with `wandb sync`
    assert len(list(out.glob(f"wandb/offline-run-*-{run_id}"))) == len(list(out.glob("wandb/offline-run-*"))) == 3
    shown = wandb_shows(out)
    assert sorted(shown) == sorted(jsonl)  # step 4 of the crashed session is gone, as from metrics.jsonl
    assert all(shown[s][k] == pytest.approx(v) for s in jsonl for k, v in jsonl[s].items() if v is not None)


# ---------------------------------------------------------------- 5. logs in a file, a bar on a terminal

def test_a_log_file_gets_a_line_per_log_interval_and_a_terminal_a_bar(tmp_path, data):
    e = env(tmp_path)
    e.pop("TQDM_DISABLE")
    with open(tmp_path / "job.log", "w") as log:  # a batch job's log: stdout is a file
        r = pretrain(tmp_path, data, tmp_path / "out", "--stop_after", "6", "--log_every", "2", stdout=log, e=e)
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / "job.log").read_text()
    assert "\r" not in text and "%|" not in text  # no bar: neither redrawn in place nor a line per refresh
    logged = [rec["step"] for rec in read_metrics(tmp_path / "out") if "loss" in rec]
    assert logged == [1, 2, 4, 6]
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{s}/10" for s in logged]
    assert all("loss" in line and "img_s" in line for line in lines)
    master, terminal = pty.openpty()  # the same run on a terminal: the bar, and no such lines
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 110, 0, 0))  # 110 columns (tqdm asks)
    cmd = [sys.executable, str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "1",
           "--out_dir", str(tmp_path / "out2"), *TINY, "--workers", "0", "--stop_after", "6", "--log_every", "2"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=terminal, stderr=subprocess.DEVNULL)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert p.wait(timeout=300) == 0
    shown = shown.decode(errors="replace")
    assert re.search("\r(?!\n)", shown) and "6/10" in shown and "loss=" in shown  # redrawn in place
    assert not any(line.startswith("step ") for line in shown.splitlines())


# ---------------------------------------------------------------- 6. a hub dataset downloaded to a folder

def write_parquet_folder(images: Path, root: Path, split_dir: dict) -> Path:
    """The image folder's pictures and classes as parquet shards (what `hf download` writes for a dataset
    stored as parquet), split_dir: {split: path of its shard under root}."""
    names = sorted(d.name for d in (images / "train").iterdir())
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    for split, shard in split_dir.items():
        files = sorted((images / split).glob("*/*.jpg"))
        rows = dict(image=[Image.open(f) for f in files], label=[names.index(f.parent.name) for f in files])
        (root / shard).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / shard))
    return root


LAYOUTS = {  # the hub's own layout (data/), and that of a parquet-converted branch (refs/convert/parquet)
    "data": {"train": "data/train-00000-of-00001.parquet", "validation": "data/validation-00000-of-00001.parquet"},
    "converted": {"train": "160px/train/0000.parquet", "validation": "160px/validation/0000.parquet"}}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_downloaded_parquet_folder_loads_in_both_scripts(tmp_path, data, monkeypatch, layout):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = write_parquet_folder(data, tmp_path / "imagenette", LAYOUTS[layout])
    folder = root / "160px" if layout == "converted" else root  # --dataset ~/data/imagenette/160px
    train, val = mvi.load_split(str(folder), "train"), mvi.load_split(str(folder), "validation")
    assert (len(train), len(val)) == (160, 40)  # 40 and 10 images of each of the 4 classes
    assert mvi.find_columns(train) == ("image", "label") and mvi.count_classes(train, "label") == 4
    assert sorted(train["label"]) == [c for c in range(4) for _ in range(40)]
    if layout == "converted":  # end to end: pretraining, then the probe
        r = pretrain(tmp_path, folder, tmp_path / "out", "--stop_after", "2")
        assert r.returncode == 0, r.stderr[-3000:]
        results = probe("--model", "pixels", "--global_size", 16, "--dataset", folder, "--out_dir", tmp_path / "p",
                        *FAST)
        assert results[str(folder)]["all"]["linear"] > 50  # the classes differ by colour: far above 25%
