"""MultiCrop of minimal_vit_inet.py: the seed README's augmentation table, checked from the drawn parameters.

Probabilities are checked over many draws from fixed seeds with a 6-sigma binomial bound (cannot flake:
the seeds are fixed, and a correct probability misses the bound with chance ~2e-9). Images are generated here.
    python -m pytest -q tests/test_multicrop.py      # a few seconds on CPU
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minimal_vit_inet as mvi  # noqa: E402

N_DRAWS = 4000


def photo(width=320, height=240, seed=0) -> Image.Image:
    """A smooth colourful RGB image with some noise: every op changes it."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(7 * x) + y, np.cos(5 * y) * x, np.sin(3 * (x + y))], -1)
    rgb += 0.3 * np.random.default_rng(seed).standard_normal(rgb.shape)
    rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min()) * 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def draws():
    """N_DRAWS parameter sets of each view type, from a fixed seed."""
    mc, g = mvi.MultiCrop(), torch.Generator().manual_seed(0)
    return {kind: [mc.params(320, 240, size, scale, g) for _ in range(N_DRAWS)]
            for kind, size, scale in [("global", 224, (0.3, 1.0)), ("local", 98, (0.05, 0.3))]}


def assert_fires_with(hits, n, p):
    assert abs(hits - n * p) <= 6 * math.sqrt(n * p * (1 - p)), f"{hits}/{n} fired, expected p={p}"


@pytest.mark.parametrize("kind", ["global", "local"])
def test_each_op_fires_with_its_probability(draws, kind):
    ps = draws[kind]
    assert_fires_with(sum(p["flip"] for p in ps), len(ps), 0.5)
    assert_fires_with(sum(bool(p["jitter"]) for p in ps), len(ps), 0.8)
    assert_fires_with(sum(p["gray"] for p in ps), len(ps), 0.2)
    assert_fires_with(sum(p["blur"] is not None for p in ps), len(ps), 0.5)
    assert_fires_with(sum(p["solarize"] for p in ps), len(ps), 0.2)


@pytest.mark.parametrize("kind", ["global", "local"])
def test_jitter_factors_and_blur_sigma_in_range(draws, kind):
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    orders = set()
    for p in draws[kind]:
        if p["jitter"]:
            assert sorted(op for op, _ in p["jitter"]) == sorted(ranges)  # all four ops, each once
            assert all(ranges[op][0] <= f <= ranges[op][1] for op, f in p["jitter"])
            orders.add(tuple(op for op, _ in p["jitter"]))
        if p["blur"] is not None:
            assert 0.1 <= p["blur"] <= 2.0
    assert len(orders) == 24  # random order: every permutation shows up in ~3200 draws
    sigmas = [p["blur"] for p in draws[kind] if p["blur"] is not None]
    assert min(sigmas) < 0.2 and max(sigmas) > 1.9  # the whole range is used


@pytest.mark.parametrize("kind,scale", [("global", (0.3, 1.0)), ("local", (0.05, 0.3))])
def test_crops_fall_in_scale_and_aspect_range(draws, kind, scale):
    areas = []
    for p in draws[kind]:
        left, top, right, bottom = p["box"]
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 320 and 0 <= top < bottom <= 240
        area = w * h / (320 * 240)
        slack = (w + h + 1) / (320 * 240)  # w and h are rounded to whole pixels
        assert scale[0] - slack <= area <= scale[1] + slack
        assert 3 / 4 - 1 / min(w, h) <= w / h <= 4 / 3 + 1 / min(w, h)
        areas.append(area)
    span = scale[1] - scale[0]
    assert min(areas) < scale[0] + 0.05 * span and max(areas) > scale[1] - 0.2 * span


def test_views_shapes_dtypes_and_reproducible():
    mc, img = mvi.MultiCrop(), photo()
    views = mc(img, torch.Generator().manual_seed(3))
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 98, 98)] * 6
    assert all(v.dtype == torch.uint8 for v in views)
    again = mc(img, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(views, again))  # exact resume depends on it
    gray = mc(img.convert("L"), torch.Generator().manual_seed(3))  # non-RGB input is converted
    assert [tuple(v.shape) for v in gray] == [(3, 224, 224)] * 2 + [(3, 98, 98)] * 6


def test_call_applies_the_drawn_params_in_order():
    """__call__ = params() then view() per view, globals first, one generator; view() = the ops in table order."""
    mc, img = mvi.MultiCrop(global_size=64, local_size=32, n_global=2, n_local=3), photo(seed=1)
    views = mc(img, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    ps = [mc.params(320, 240, 64, mc.global_scale, g) for _ in range(2)] + \
         [mc.params(320, 240, 32, mc.local_scale, g) for _ in range(3)]
    for v, p in zip(views, ps):
        assert torch.equal(v, mc.view(img, p))

    p = {"size": 48, "box": (10, 20, 210, 180), "flip": True, "gray": True, "blur": 1.3, "solarize": True,
         "jitter": [("hue", 0.05), ("contrast", 1.3), ("brightness", 0.7), ("saturation", 1.1)]}
    ref = img.resize((48, 48), Image.BILINEAR, box=(10, 20, 210, 180)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    ref = TF.adjust_saturation(TF.adjust_brightness(TF.adjust_contrast(TF.adjust_hue(ref, 0.05), 1.3), 0.7), 1.1)
    ref = TF.rgb_to_grayscale(ref, num_output_channels=3).filter(ImageFilter.GaussianBlur(1.3))
    assert torch.equal(mc.view(img, p), TF.pil_to_tensor(TF.solarize(ref, 128)))
    off = {"size": 48, "box": (10, 20, 210, 180), "flip": False, "jitter": [], "gray": False, "blur": None, "solarize": False}
    assert torch.equal(mc.view(img, off), TF.pil_to_tensor(img.resize((48, 48), Image.BILINEAR, box=(10, 20, 210, 180))))


def test_normalize_on_device_matches_cpu_torchvision():
    x = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), mvi.IMAGENET_MEAN, mvi.IMAGENET_STD)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = mvi.normalize(x.to(device))
    assert out.dtype == torch.float32 and out.device.type == device
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
