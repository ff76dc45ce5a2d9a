"""Faults and bad input for minimal_vit_inet.py: preemption of one rank, SIGKILL at any moment (during a
checkpoint write too), broken and unusual image files, a dataset without images, another run's out_dir."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pretrain import ROOT, TINY, env, free_port, launch_two_nodes, read_metrics  # noqa: E402

import minimal_vit_inet as mvi  # noqa: E402


def launch(tmp, data, out, *extra, nproc=2, epochs=50):
    """Start a tiny training under torchrun in its own process group; returns the Popen."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", str(epochs), "--out_dir", str(out),
           *TINY, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_steps(p, out, n, timeout=180):
    """Wait until the running job has logged n steps (reading only complete lines: it is being written)."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if (out / "metrics.jsonl").exists():
            lines = [line for line in open(out / "metrics.jsonl") if line.endswith("\n")]
            if sum("loss" in json.loads(line) for line in lines) >= n:
                return
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {n}: {p.poll()}")


def rank_pid(agent_pid, rank):
    """The pid of the torchrun worker with RANK=rank: a child of the torchrun agent (read from /proc, Linux)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under {agent_pid}")


def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint(tmp_path, data):
    out = tmp_path / "out"
    p = launch(tmp_path, data, out)
    wait_for_steps(p, out, 2)
    os.kill(rank_pid(p.pid, 1), signal.SIGTERM)  # preemption notice reaching rank 1 only
    stdout, _ = p.communicate(timeout=180)
    assert p.returncode == 0, stdout[-3000:]  # torchrun: every rank exited cleanly
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert f"stopped after step {step} (SIGTERM)" in stdout and "resume with the same command" in stdout


def test_sigkill_while_writing_checkpoints_never_leaves_a_broken_one(tmp_path):
    """A process writes checkpoints back to back (each a few MB, with the script's own write_atomic); SIGKILL lands
    at random moments, mostly mid-write: the file on disk always loads, whole."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import minimal_vit_inet as mvi
from sigreg import SIGReg
model = mvi.LeJEPA(mvi.build_backbone("resnet18"), 256, 32)
opt = torch.optim.AdamW(model.parameters())
for step in range(1, 10**6):
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), sigreg=SIGReg(8).state_dict(), step=step)
    mvi.write_atomic(state, {str(tmp_path / "ckpt.pt")!r})
    print(step, flush=True)
"""
    rng = random.Random(0)
    last = 0
    for trial in range(4):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # the first checkpoint is complete
        time.sleep(rng.uniform(0.05, 1.0))
        p.kill()
        p.wait()
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        assert ckpt["step"] >= 1 and ckpt["model"] and ckpt["optimizer"] is not None
        last = ckpt["step"]
    assert last >= 1


def test_sigkill_mid_run_resumes_from_the_last_checkpoint(tmp_path, data):
    out = tmp_path / "out"
    p = launch(tmp_path, data, out, "--save_every", "3", epochs=2)
    wait_for_steps(p, out, 5)
    for pid in [rank_pid(p.pid, 0), rank_pid(p.pid, 1), p.pid]:  # the whole job dies at once, no handler runs
        os.kill(pid, signal.SIGKILL)
    p.wait()
    saved = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert saved >= 3
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "2", "--out_dir", str(out),
           *TINY, "--save_every", "3"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"start step {saved}" in r.stdout
    steps = [rec["step"] for rec in read_metrics(out) if "loss" in rec]
    assert steps == sorted(set(steps)) == list(range(1, 21))  # every step logged once, none lost, none twice
    assert (out / "export" / "model.safetensors").exists()


def write_odd_images(root: Path):
    """A labelled folder where some files are broken and others are in unusual modes or tiny."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(root / "train" / f"c{c}" / f"{i}.jpg")
    (root / "train" / "c0" / "3_garbage.jpg").write_bytes(b"this is not an image" * 20)
    good = (root / "train" / "c1" / "0.jpg").read_bytes()
    (root / "train" / "c1" / "3_truncated.jpg").write_bytes(good[: len(good) // 2])
    d = root / "train" / "c1"
    Image.new("CMYK", (40, 30), (10, 200, 30, 40)).save(d / "cmyk.jpg")
    Image.new("L", (30, 40), 100).save(d / "gray.jpg")
    Image.new("P", (30, 30), 5).save(d / "palette.png")
    Image.new("RGBA", (30, 30), (1, 200, 3, 100)).save(d / "rgba.png")
    Image.new("RGB", (3, 2), (1, 2, 3)).save(d / "tiny.png")  # smaller than any crop
    return root


def test_odd_images_are_converted_and_broken_ones_skipped_and_reported(tmp_path, capfd):
    data = write_odd_images(tmp_path / "imgs")
    ds = mvi.load_split(str(data), "train")
    import datasets
    paths = [row["image"]["path"] for row in ds.cast_column("image", datasets.Image(decode=False))]
    bad = [i for i, p in enumerate(paths) if "garbage" in p or "truncated" in p]
    assert len(bad) == 2 and bad[1] - bad[0] > 1 and bad[1] < len(ds) - 1  # apart: each replaced by a good one
    mc = mvi.MultiCrop(mvi.Config(global_size=32, local_size=16, n_local=2))
    views = mvi.ViewsDataset(ds, "image", "label", mc, seed=0)
    items = [views[(0, i)] for i in range(len(ds))]
    assert capfd.readouterr().err.count("warning: skipped unreadable image") == 2  # the garbage and the truncated file
    for crops, label in items:
        assert [tuple(v.shape) for v, _ in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
        assert all(v.dtype == torch.uint8 for v, _ in crops) and label in (0, 1)

    out = tmp_path / "out"  # end to end, single process, 2 DataLoader workers, one batch = the whole set
    cmd = [sys.executable, str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "2",
           "--out_dir", str(out), *TINY, "--batch_size", str(len(ds)), "--workers", "2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("warning: skipped unreadable image") == 4  # 2 files, met once in each of the 2 epochs
    assert (out / "export" / "model.safetensors").exists()


def test_linear_probe_skips_and_reports_broken_images(tmp_path):
    data = write_odd_images(tmp_path / "imgs")
    cmd = [sys.executable, str(ROOT / "linear_probe.py"), "--model", "resnet18", "--global_size", "32",
           "--dataset", str(data), "--val_split", "train", "--out_dir", str(tmp_path / "probe"), "--workers", "0"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stderr.count("warning: skipped unreadable image #") == 4  # train and val extraction: both files
    result = json.load(open(tmp_path / "probe" / "results.json"))
    assert "nan" not in json.dumps(result).lower()


def run_script(tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "minimal_vit_inet.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=120)


def test_dataset_without_an_image_column_names_the_columns(tmp_path):
    import datasets
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"caption": ["a", "b"], "score": [1, 2]})) \
        .save_to_disk(str(tmp_path / "noimg"))
    r = run_script(tmp_path, "--dataset", str(tmp_path / "noimg"), "--out_dir", str(tmp_path / "out"), *TINY)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "no image column" in last and "caption" in last and "score" in last


def test_more_steps_per_epoch_than_the_data_holds_is_refused(tmp_path, data):
    # 160 images / batch 16 = 10 steps: asking for 11 used to run out of data at step 11 and crash
    r = run_script(tmp_path, "--dataset", str(data), "--out_dir", str(tmp_path / "out"), *TINY, "--steps_per_epoch", "11")
    assert r.returncode != 0
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --steps_per_epoch 11") and "at most 10" in line
    assert not (tmp_path / "out" / "ckpt.pt").exists()


@pytest.mark.parametrize("change", [["--model", "vit_small_patch16_224"], ["--lamb", "0.2"], ["--proj_dim", "32"]])
def test_out_dir_of_another_run_is_refused_and_untouched(tmp_path, change):
    out = tmp_path / "out"
    out.mkdir()
    cfg = mvi.parse_config(TINY + ["--out_dir", str(out)])
    model = mvi.LeJEPA(mvi.build_backbone(cfg.model, cfg.global_size), cfg.proj_hidden, cfg.proj_dim)
    import dataclasses
    state = dict(model=model.state_dict(), step=5, config=dataclasses.asdict(cfg))  # as save_checkpoint writes
    mvi.write_atomic(state, str(out / "ckpt.pt"))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()}
    # the dataset is an empty folder: had the script gone on to load it, it would fail with another error
    (tmp_path / "empty").mkdir()
    r = run_script(tmp_path, "--dataset", str(tmp_path / "empty"), "--out_dir", str(out), *TINY, *change)
    assert r.returncode != 0
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "belongs to another run" in line and change[0] in line
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()} == before  # nothing written


# ---------------------------------------------------------------- cluster failures: end at once, one run per out_dir

@pytest.mark.parametrize("nproc", [1, 2])
def test_an_error_mid_training_ends_the_job_at_once(tmp_path, data, nproc):
    """A checkpoint write that fails (as on a full disk: here ckpt.pt.tmp is a folder) at step 3, with a
    DataLoader worker running: the job must end, non-zero, with the error, not hang (a hang meets the timeout)."""
    out = tmp_path / "out"
    (out / "ckpt.pt.tmp").mkdir(parents=True)
    script = [str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "50", "--out_dir", str(out),
              *TINY, "--save_every", "3"]
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), *script]
    # it used to hang forever, joining a DataLoader worker that ignores SIGTERM: subprocess.run's timeout fails it
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert "Is a directory" in r.stdout + r.stderr, r.stderr[-3000:]
    assert max(rec["step"] for rec in read_metrics(out) if "loss" in rec) <= 3  # the save after step 3 failed


def snapshot(folder: Path) -> dict:
    return {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(folder.iterdir()) if f.is_file()}


def test_second_launch_on_an_out_dir_in_use_is_refused_and_touches_nothing(tmp_path, data):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "50",
                              "--out_dir", str(out), *TINY], cwd=ROOT, env=env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_steps(first, out, 12)  # past the first epoch: a checkpoint exists too
        os.kill(first.pid, signal.SIGSTOP)  # frozen, so that its own writes do not change the folder; it keeps the lock
        time.sleep(0.5)
        before = snapshot(out)
        assert "ckpt.pt" in before and "metrics.jsonl" in before
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "50", "--out_dir", str(out), *TINY]
        r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        refusals = [line for line in r.stderr.splitlines() if "is in use by another run" in line]
        assert len(refusals) == 2, r.stderr[-3000:]  # both ranks end with the same one line
        assert refusals[0].startswith("error:") and str(out) in refusals[0] and f"pid {first.pid}" in refusals[0]
        assert "error on rank" not in r.stderr  # a clean refusal, not a crash (torchrun adds its own report)
        assert snapshot(out) == before  # bytes and mtimes of every file
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the run and its DataLoader worker die at once, no handler runs
        first.wait()
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    r = run_script(tmp_path, "--dataset", str(data), "--epochs", "50", "--out_dir", str(out), *TINY,
                   "--stop_after", str(step + 1))  # the OS released the dead run's lock: accepted, and resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"start step {step}" in r.stdout and f"stopped after step {step + 1}" in r.stdout


def test_an_out_dir_that_only_rank_0_sees_is_refused_by_every_rank(tmp_path, data):
    """Nodes must share out_dir: a rank that sees another folder (here rank 1 is handed an empty one, as a node
    without the shared filesystem would be) would resume at another step or none. Both ranks end in one line."""
    out = tmp_path / "out"
    r = run_script(tmp_path, "--dataset", str(data), "--epochs", "2", "--out_dir", str(out), *TINY, "--workers", "0",
                   "--stop_after", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    wrapper = tmp_path / "rank1_elsewhere.py"  # rank 1 reads --out_dir as an empty folder of its own
    wrapper.write_text("\n".join([
        "import os, sys",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "import minimal_vit_inet as mvi",
        f"argv = [a if os.environ['RANK'] == '0' or a != {str(out)!r} else {str(tmp_path / 'elsewhere')!r}"
        " for a in sys.argv[1:]]",
        "mvi.run(mvi.main, mvi.parse_config(argv))"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(wrapper), "--dataset", str(data), "--epochs", "2", "--out_dir", str(out), *TINY, "--workers", "0"]
    before = snapshot(out)
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if "every node sees" in line]
    assert len(lines) == 2 and lines[0].startswith("error: the ranks find checkpoints of steps [2, 0]"), \
        r.stderr[-3000:]
    before.pop("lock")  # rank 0 took the lock (its pid is in the file): nothing else changed
    assert {name: v for name, v in snapshot(out).items() if name != "lock"} == before


def processes_of(out: Path) -> list:
    """Live processes (not zombies) whose command line names out: a run's ranks and their DataLoader workers."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(out).encode() in open(f"/proc/{pid}/cmdline", "rb").read() and \
                    open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_training_processes_exit_when_torchrun_is_killed(tmp_path, data):
    """kill -9 of torchrun alone: its ranks notice and exit within seconds, and so do their DataLoader workers
    (one blocked on a full pipe to its dead rank once stayed for hours), so nothing writes to out_dir or holds
    memory and the lock is free."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "minimal_vit_inet.py"), "--dataset", str(data), "--epochs", "50", "--out_dir", str(out), *TINY]
    with open(tmp_path / "log.txt", "w") as log:  # a file, not a pipe: nobody reads it while the ranks run on
        p = subprocess.Popen(cmd, cwd=ROOT, env=env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    wait_for_steps(p, out, 3)
    ranks = [rank_pid(p.pid, 0), rank_pid(p.pid, 1)]
    running = processes_of(out)  # the ranks and their DataLoader workers
    assert set(ranks) < set(running), (ranks, running)
    os.kill(p.pid, signal.SIGKILL)  # torchrun alone (the OOM killer, kill -9); its workers are not signalled
    p.wait()
    deadline = time.time() + 30
    while time.time() < deadline and processes_of(out):
        time.sleep(0.2)
    assert not processes_of(out), f"training processes {processes_of(out)} outlived torchrun"
    size = (out / "metrics.jsonl").stat().st_size
    time.sleep(3)
    assert (out / "metrics.jsonl").stat().st_size == size  # nobody writes there any more
    assert "torchrun (pid" in (tmp_path / "log.txt").read_text()  # each rank said why it ended
    take_lock = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import minimal_vit_inet as m; " \
                f"sys.exit(1 if m.lock_out_dir({str(out)!r}) else 0)"
    assert subprocess.run([sys.executable, "-c", take_lock]).returncode == 0  # and the lock is free


def test_a_rank_killed_on_one_node_ends_every_node(tmp_path, data):
    """Two torchrun launchers (the 'nodes', one process each) through the c10d rendezvous; SIGKILL the rank of
    the first: the rank on the other node leaves its collective with an error, and both launchers exit,
    non-zero (not at the collectives' 60-minute timeout: the wait's 120 s would fail first)."""
    out = tmp_path / "out"
    nodes = launch_two_nodes(tmp_path, data, out, 50, start_new_session=True)
    try:
        wait_for_steps(nodes[0], out, 3)
        for rank in (0, 1):  # the rendezvous decides which node holds rank 0
            try:
                victim = rank_pid(nodes[0].pid, rank)
                break
            except AssertionError:
                continue
        os.kill(victim, signal.SIGKILL)
        codes = [p.wait(timeout=120) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all(code != 0 for code in codes), codes


# ---------------------------------------------------------------- hub failures: one line, every rank ends

def test_unreachable_hub_ends_every_rank_with_one_line(tmp_path):
    """Offline (HF_HUB_OFFLINE=1, as on a machine without hub access) with an id that is not cached: each script,
    and each rank under torchrun, ends with the same one line, before any model is built."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "minimal_vit_inet.py"), "--dataset", "nobody/no-such-dataset", "--out_dir", str(tmp_path / "o")]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: nobody/no-such-dataset:")]
    assert len(lines) == 2 and "cannot reach the Hugging Face hub" in lines[0] and "--dataset FOLDER" in lines[0], \
        r.stderr[-3000:]
    assert "error on rank" not in r.stderr  # no traceback of ours: a clean, explained exit
    probe = [sys.executable, str(ROOT / "linear_probe.py"), "--model", "pixels", "--dataset", "pets",
             "--out_dir", str(tmp_path / "p")]
    r = subprocess.run(probe, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("error: pets (timm/oxford-iiit-pet): cannot reach"), r.stderr[-2000:]


def test_an_error_line_is_written_in_one_piece(monkeypatch):
    """Ranks share one stderr: print() writes the text, then the newline, so two ranks' lines could run together
    (seen once in CI: "...cached copyerror: ...", one line where the test above expects two). run() writes each
    sys.exit line in one write, the newline included."""
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    class Exited(Exception):
        pass

    def fake_exit(code):  # os._exit, without ending the test process
        raise Exited(code)

    monkeypatch.setattr(sys, "stderr", Recorder())
    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(Exited) as e:
        mvi.run(sys.exit, "error: something one line says")
    assert writes == ["error: something one line says\n"] and e.value.args == (1,)


def test_hub_messages_say_what_to_do():
    """datasets' own messages (load.py, builder.py, arrow_reader.py) in one line, with the two hints that matter:
    gated (accept the terms, log in) and offline (a local copy); the others are datasets' own words."""
    import datasets
    gated = datasets.exceptions.DatasetNotFoundError(
        "Dataset 'timm/imagenet-1k-wds' is a gated dataset on the Hub. You must be authenticated to access it.")
    missing = datasets.exceptions.DatasetNotFoundError("Dataset 'a/b' doesn't exist on the Hub or cannot be accessed.")
    config = ValueError("BuilderConfig 'x' not found. Available: ['plain_text']")
    split = ValueError('Unknown split "val". Should be one of [\'train\', \'test\'].')
    assert "hf auth login" in mvi.hub_error("timm/imagenet-1k-wds", gated)
    assert "https://huggingface.co/datasets/timm/imagenet-1k-wds" in mvi.hub_error("timm/imagenet-1k-wds", gated)
    offline = mvi.hub_error("a/b", ConnectionError("Couldn't reach 'a/b' on the Hub (LocalEntryNotFoundError)"))
    assert "cannot reach the Hugging Face hub" in offline and "--dataset FOLDER" in offline
    assert mvi.hub_error("a/b", missing) == str(missing) and "plain_text" in mvi.hub_error("a/b", config)
    assert "Unknown split \"val\"" in mvi.hub_error("a/b", split) and "'test'" in mvi.hub_error("a/b", split)
    assert all("\n" not in mvi.hub_error("a/b", e) for e in (gated, missing, config, split))
