"""bench/gpu_check.py cannot rot before a GPU arrives: its CPU form runs end to end here, every item.

The data for item 5 is test_pretrain's small image folder written here, its validation split renamed test
(no network, nothing from ../shared); the photos are synthetic (--photos '')."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_pretrain import write_image_folder  # noqa: E402


def test_cpu_form_writes_every_items_rows_with_sane_values(tmp_path):
    data = write_image_folder(tmp_path / "imgs", per_class=24)
    (data / "validation").rename(data / "test")  # the CIFAR-10 archive's layout: train/ and test/
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), TQDM_DISABLE="1")
    env.pop("RANK", None)
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out), "--photos", "",
                        "--cifar", str(data)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    table = (out / "gpu_check.md").read_text()
    assert table.startswith("# gpu_check: CPU") and "failed" not in table and "skipped: no" not in table, table
    for item in range(1, 6):
        assert f"\n| {item} | " in table, f"no row for item {item}:\n{table}"
    assert table.strip() in r.stdout, "the table is printed at the end"
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["meta"]["form"] == "CPU" and {row[0] for row in result["rows"]} == {1, 2, 3, 4, 5}
    v = result["values"]
    # 1. correctness
    assert v["sigreg_value_rel_err"] < 1e-5 and v["sigreg_grad_rel_err"] < 1e-4
    assert v["bf16_autocast_rel_err"] < 1e-5 and v["bf16_autocast_fp32_out"] == 1
    assert v["colour_max_abs_diff"] < 1e-5  # CPU against CPU here; on a GPU the table shows the real gap
    # 2. the step and the backbone alone, eager and compiled (the CPU form compiles with the "eager" backend:
    # dynamo only); the backbone alone reuses the step's compiled backbone
    for tag in ("eager", "compiled", "backbone_eager", "backbone_compiled"):
        assert v[f"host_syncs_{tag}"] == 0 and v[f"images_per_s_{tag}"] > 0, v
    assert v["compile_graphs"] > 0 and v["compile_graphs_backbone_alone"] == 0
    parts = ("sigreg", "heads", "colour", "colour_compiled")
    assert 0 < v["backbone_tflop"] < v["step_tflop"] and all(v[f"part_ms_{k}"] > 0 for k in parts)
    assert {"gap_ms_eager", "gap_ms_compiled"} <= set(v) and "beyond the backbone alone" in table
    # 3. SIGReg (the direct form) against the recurrence: same values
    assert all(v[f"sigreg_rel_diff_{n}"] < 1e-4 and v[f"recurrence_ms_{n}"] > 0 for n in (256, 1024))
    # 4. the data path
    assert v["worker_images_per_s_per_core"] > 0 and v["cifar_worker_images_per_s_per_core"] > 0
    assert v["cores_per_gpu"] > 0
    # 5. end to end: torchrun pretraining, then both probes (the colour-coded classes are easy)
    assert v["e2e_steps"] >= 1 and math.isfinite(v["e2e_final_loss"])
    assert all(0 <= v[f"e2e_{k}"] <= 100 for k in ("lejepa_linear", "lejepa_knn", "random_linear", "random_knn"))
    for log in ("e2e_pretrain.log", "e2e_probe_lejepa.log", "e2e_probe_random.log"):
        assert (out / log).stat().st_size > 0
