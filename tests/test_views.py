"""1. Views of minimal_vit_inet.py: MultiCrop's draws follow the official README's augmentation table, and the
colour stage on the device matches torchvision image by image.

Probabilities are checked over many draws from fixed seeds with a 6-sigma binomial bound (cannot flake:
the seeds are fixed, and a correct probability misses the bound with chance ~2e-9). Images are generated here.
    python -m pytest -q tests/test_views.py         # a few seconds on CPU
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minimal_vit_inet as mvi  # noqa: E402

N_DRAWS = 4000


def seeded(seed: int):
    """MultiCrop draws from torch's global RNG, which ViewsDataset seeds for each image."""
    torch.manual_seed(seed)


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
    mc = mvi.MultiCrop(mvi.Config())
    seeded(0)
    return {kind: [mc.params(320, 240, size, scale) for _ in range(N_DRAWS)]
            for kind, size, scale in [("global", 224, (0.3, 1.0)), ("local", 98, (0.05, 0.3))]}


def assert_fires_with(hits, n, p):
    assert abs(hits - n * p) <= 6 * math.sqrt(n * p * (1 - p)), f"{hits}/{n} fired, expected p={p}"


def coins(p) -> dict:
    """Which ops a view's draws switch on, read from MultiCrop.params' colour vector."""
    c = p["colour"]
    return {"flip": p["flip"], "jitter": bool(c[0] >= 0), "gray": bool(c[8]), "blur": bool(c[9] > 0),
            "solarize": bool(c[10])}


@pytest.mark.parametrize("kind", ["global", "local"])
def test_each_op_fires_with_its_probability(draws, kind):
    fired = [coins(p) for p in draws[kind]]
    for op, prob in {"flip": 0.5, "jitter": 0.8, "gray": 0.2, "blur": 0.5, "solarize": 0.2}.items():
        assert_fires_with(sum(f[op] for f in fired), len(fired), prob)
    # independent coins: gray and solarize together fire with p = 0.2 * 0.2
    assert_fires_with(sum(f["gray"] and f["solarize"] for f in fired), len(fired), 0.04)


@pytest.mark.parametrize("kind", ["global", "local"])
def test_jitter_factors_and_blur_sigma_in_range(draws, kind):
    ranges = [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]  # brightness, contrast, saturation, hue
    orders = set()
    for p in draws[kind]:
        c = p["colour"].tolist()
        assert all(lo <= f <= hi for f, (lo, hi) in zip(c[4:8], ranges))
        if c[0] >= 0:
            assert sorted(c[:4]) == [0, 1, 2, 3]  # all four ops, each once
            orders.add(tuple(c[:4]))
        else:
            assert c[:4] == [-1] * 4  # jitter off: no op in any slot
        assert c[9] == 0 or 0.1 <= c[9] <= 2.0
    assert len(orders) == 24  # random order: every permutation shows up in ~3200 draws
    for k, (lo, hi) in enumerate(ranges):  # the whole range is used
        factors = [p["colour"][4 + k].item() for p in draws[kind]]
        assert min(factors) < lo + 0.01 * (hi - lo) and max(factors) > hi - 0.01 * (hi - lo)
    sigmas = [p["colour"][9].item() for p in draws[kind] if p["colour"][9] > 0]
    assert min(sigmas) < 0.2 and max(sigmas) > 1.9


def test_jitter_strengths_set_torchvisions_ranges():
    """--jitter b c s h draws brightness, contrast and saturation in [max(0, 1 - x), 1 + x] and the hue in
    [-h, h], as torchvision's ColorJitter(b, c, s, h); a hue beyond half a turn is refused in one line."""
    mc = mvi.MultiCrop(mvi.Config(jitter=(0.8, 0.8, 1.2, 0.2)))
    seeded(0)
    c = torch.stack([mc.params(320, 240, 32, (0.3, 1.0))["colour"] for _ in range(3000)])
    c = c[c[:, 0] >= 0]  # the views that drew the jitter
    for k, (lo, hi) in enumerate([(0.2, 1.8), (0.2, 1.8), (0.0, 2.2), (-0.2, 0.2)]):
        assert lo <= c[:, 4 + k].min() < lo + 0.01 and hi - 0.01 < c[:, 4 + k].max() <= hi
    assert mvi.parse_config(["--jitter", "0.8", "0.8", "0.8", "0.2"]).jitter == (0.8, 0.8, 0.8, 0.2)
    with pytest.raises(SystemExit, match="--jitter strengths must be >= 0, the hue's <= 0.5"):
        mvi.parse_config(["--jitter", "0.4", "0.4", "0.2", "0.7"])


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
    mc, img = mvi.MultiCrop(mvi.Config()), photo()
    seeded(3)
    views = mc(img)
    assert [tuple(v.shape) for v, _ in views] == [(3, 224, 224)] * 2 + [(3, 98, 98)] * 6
    assert all(v.dtype == torch.uint8 and c.dtype == torch.float32 and c.shape == (11,) for v, c in views)
    seeded(3)
    again = mc(img)
    assert all(torch.equal(a, b) for va, vb in zip(views, again) for a, b in zip(va, vb))  # exact resume needs it
    seeded(4)
    other = mc(img)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(views, other))  # every draw comes from the generator
    seeded(3)
    gray = mc(img.convert("L"))  # non-RGB input is converted
    assert [tuple(v.shape) for v, _ in gray] == [(3, 224, 224)] * 2 + [(3, 98, 98)] * 6


def test_call_applies_the_drawn_params_in_order():
    """__call__ = params() then view() per view, globals first, one RNG stream; view() = crop, resize, flip."""
    mc, img = mvi.MultiCrop(mvi.Config(global_size=64, local_size=32, n_global=2, n_local=3)), photo(seed=1)
    seeded(5)
    views = mc(img)
    seeded(5)
    ps = [mc.params(320, 240, 64, (0.3, 1.0)) for _ in range(2)] + \
         [mc.params(320, 240, 32, (0.05, 0.3)) for _ in range(3)]
    for (v, c), p in zip(views, ps):
        assert torch.equal(v, mc.view(img, p)) and torch.equal(c, p["colour"])

    box = (10, 20, 210, 180)
    ref = TF.pil_to_tensor(img.resize((48, 48), Image.BILINEAR, box=box))
    assert torch.equal(mc.view(img, {"size": 48, "box": box, "flip": False}), ref)
    assert torch.equal(mc.view(img, {"size": 48, "box": box, "flip": True}), ref.flip(-1))


def torchvision_reference(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """One image, the official README's ops one after another with torchvision's float kernels: the independent reference."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    c = colour.tolist()
    x = TF.to_dtype(x, torch.float32, scale=True)
    for k in c[:4]:
        if k >= 0:
            x = ops[int(k)](x, c[4 + int(k)])
    if c[8]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if c[9] > 0:
        x = TF.gaussian_blur(x, [23, 23], [c[9], c[9]])
    if c[10]:
        x = TF.solarize(x, threshold=128 / 255)
    return TF.normalize(x, mvi.IMAGENET_MEAN, mvi.IMAGENET_STD)


@pytest.mark.parametrize("size,jitter", [(32, (0.4, 0.4, 0.2, 0.1)), (98, (0.4, 0.4, 0.2, 0.1)),
                                         (32, (0.8, 0.8, 0.8, 0.2))])
def test_colour_augment_on_device_matches_torchvision_per_image(size, jitter):
    """A batch with every image's own draws (the table's, or the official minimal example's stronger jitter,
    plus hand-set corner cases) equals torchvision applied image by image on the CPU."""
    mc = mvi.MultiCrop(mvi.Config(jitter=jitter))
    seeded(7)
    colour = [mc.params(320, 240, size, (0.05, 1.0))["colour"] for _ in range(40)]
    colour += [torch.tensor([-1.0] * 4 + [1, 1, 1, 0, 0, 0, 0]),  # nothing at all: plain normalisation
               torch.tensor([3.0, 2, 1, 0, 1.4, 0.6, 1.2, -0.1, 1, 2.0, 1]),  # every op, extreme arguments
               torch.tensor([0.0, 1, 2, 3, 0.6, 1.4, 0.8, 0.1, 0, 0.1, 0])]
    colour = torch.stack(colour)
    imgs = torch.stack([TF.pil_to_tensor(photo(size, size, seed=i)) for i in range(len(colour))])
    imgs[0] = 128  # a flat grey image: hue undefined, contrast's mean = the pixels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = mvi.colour_augment(imgs.to(device), colour.to(device))
    assert out.dtype == torch.float32 and out.shape == imgs.shape and out.device.type == device
    ref = torch.stack([torchvision_reference(x, c) for x, c in zip(imgs, colour)])
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=2e-4)  # ~5e-5 in [0, 1] units: float rounding only
    assert (out.cpu() - ref).abs().amax((1, 2, 3)).max() < 2e-4


def test_colour_augment_of_a_batch_that_draws_no_op():
    x = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    off = torch.tensor([[-1.0] * 4 + [1, 1, 1, 0, 0, 0, 0]] * 3)
    assert torch.equal(mvi.colour_augment(x, off), mvi.normalize(x))


def test_blur_of_views_smaller_than_the_kernel():
    """8 px views (kernel 23 > view): the kernel shrinks to the view; sigma 0 leaves the image as it is."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = mvi.gaussian_blur(x, torch.tensor([1.5, 0.0], dtype=torch.float64))
    assert torch.equal(out[1], x[1])
    # reference: direct sum over a reflect-padded 15-tap window, float64
    t = torch.arange(-7, 8, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / 1.5) ** 2)
    k /= k.sum()
    pad = torch.nn.functional.pad(x[:1], (7, 7, 7, 7), mode="reflect")[0]
    ref = torch.einsum("i,j,cijhw->chw", k, k, pad.unfold(1, 8, 1).unfold(2, 8, 1)[:, :15, :15])
    torch.testing.assert_close(out[0], ref)


def test_normalize_on_device_matches_cpu_torchvision():
    x = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), mvi.IMAGENET_MEAN, mvi.IMAGENET_STD)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = mvi.normalize(x.to(device))
    assert out.dtype == torch.float32 and out.device.type == device
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_the_colour_stage_of_a_step_dispatches_at_most_400_ops():
    """On a GPU every aten op is at least one kernel launch, and the colour stage was launch-bound (2,934 ops
    per step, one call per view gathering and scattering each op's images). A step's views, collated as the
    DataLoader worker does (2 x 224 px + 6 x 98 px per image), take one call per view size: at most 400 ops in
    all, whatever the images draw.
    Why 400 and not 300: the readable form (issue #24) computes each of ColorJitter's 4 ops in each of its 4
    slots and keeps the drawn one with torch.where: 374 ops per step on torch 2.14 (~187 per call: the 16 op
    evaluations ~150, the hue's closed form ~19 of them each time). The former form, 268 ops, blended the
    three blends in one expression and ran the hue once at a fixed place; no GPU measured a gain from it, and
    the issue keeps a trick only where bench/gpu_check.py measures one on a card."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    mc = mvi.MultiCrop(mvi.Config())
    seeded(0)
    images = [mc(photo(seed=i)) for i in range(6)]  # 8 (pixels, draws) each
    groups, _ = mvi.collate_views([(views, 0) for views in images])
    assert [tuple(x.shape) for x, _ in groups] == [(12, 3, 224, 224), (36, 3, 98, 98)]
    for v, n in ((0, 0), (1, 2), (2, 4), (7, 5)):  # view v of image n: globals first, then view-major
        size, at = (0, v * 6 + n) if v < 2 else (1, (v - 2) * 6 + n)
        assert torch.equal(groups[size][0][at], images[n][v][0]) and torch.equal(groups[size][1][at], images[n][v][1])
    mvi.colour_augment(*groups[0])  # the first call builds the per-device constants
    with Count() as count:
        out = [mvi.colour_augment(x, c) for x, c in groups]
    assert len(count.ops) <= 400, sorted(set(count.ops))
    assert "index" not in count.ops and "nonzero" not in count.ops  # no gather of each op's images
    assert all(torch.isfinite(o).all() and o.dtype == torch.float32 for o in out)
