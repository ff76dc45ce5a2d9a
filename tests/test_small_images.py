"""Small images (issue #22, item 5): timm's own model arguments reach the backbone through --model_kwargs, and
the checkpoint, linear_probe.py and the export rebuild the same network; a bad argument ends in one line."""
import subprocess
import sys

import pytest
import timm
import torch

import linear_probe
import minimal_vit_inet as mvi
from test_pretrain import ROOT, env


def test_model_kwargs_reach_the_backbone_the_probe_and_the_export(tmp_path, data):
    out = tmp_path / "out"
    cmd = [sys.executable, "minimal_vit_inet.py", "--dataset", str(data), "--model", "resnet18",
           "--model_kwargs", '{"output_stride": 16}', "--global_size", "32", "--local_size", "16", "--n_local", "2",
           "--proj_hidden", "32", "--proj_dim", "8", "--num_slices", "16", "--batch_size", "16", "--epochs", "2",
           "--steps_per_epoch", "2", "--workers", "0", "--out_dir", str(out), "--val_split", "test"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "online probe off (--val_split 'test': no labels), 4 classes" in r.stdout  # the data has no test split
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # timm's ResNet at output stride 16 keeps a 2 x 2 map of a 32 px view; at its default 32, a 1 x 1 map
    assert timm.create_model("resnet18").forward_features(x).shape[-2:] == (1, 1)
    hub = timm.create_model(f"local-dir:{out / 'export'}", pretrained=True).eval()  # rebuilt from config.json
    assert hub.forward_features(x).shape[-2:] == (2, 2)
    model = linear_probe.build_model(linear_probe.Config(checkpoint=str(out / "ckpt.pt")), torch.device("cpu"))[0]
    assert model.forward_features(x).shape[-2:] == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hub(x))  # the same weights through both doors


def test_model_kwargs_are_checked_before_anything_loads():
    vit = ["--model", "vit_tiny_patch16_224", "--model_kwargs", '{"patch_size": 4}', "--global_size", "32"]
    assert mvi.parse_config([*vit, "--local_size", "16"]).model_kwargs == {"patch_size": 4}
    with pytest.raises(SystemExit, match="cuts images into 4 px patches"):  # timm's patch, not the name's 16
        mvi.parse_config([*vit, "--local_size", "18"])
    assert mvi.parse_config([*vit, "--n_local", "0"]).local_size == 98  # the small-image command: no local views
    with pytest.raises(SystemExit, match="error: resnet18 with --model_kwargs .*no_such_argument"):
        mvi.parse_config(["--model", "resnet18", "--model_kwargs", '{"no_such_argument": 1}'])
    with pytest.raises(SystemExit, match="error: resnet18 with --model_kwargs"):  # JSON, but not an object
        mvi.parse_config(["--model", "resnet18", "--model_kwargs", "[16]"])
    with pytest.raises(SystemExit):  # not JSON: argparse's one line, "invalid loads value"
        mvi.parse_config(["--model_kwargs", "{output_stride: 16}"])
