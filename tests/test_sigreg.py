"""sigreg.py against independent references: numpy float64 integration, a single process against
two DDP ranks, fp32 against bf16 autocast, and the statistic's known Gaussian floor."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sigreg

HERE = os.path.dirname(os.path.abspath(__file__))


def reference_statistic(x, t_max=3.0, num_points=None):
    """N * integral_{-t_max}^{t_max} |ecf(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt per column, in numpy float64.

    num_points=M: trapezoid on the symmetric grid of 2M-1 knots (what sigreg.py approximates with
    M knots on [0, t_max]); None: a fine grid (20001 knots), i.e. the integral itself."""
    x = np.asarray(x, dtype=np.float64)  # (N, K)
    t = np.linspace(-t_max, t_max, 20001 if num_points is None else 2 * num_points - 1)
    ecf = np.exp(1j * t[:, None, None] * x[None]).mean(axis=1)  # (T, K), complex
    integrand = np.abs(ecf - np.exp(-t[:, None] ** 2 / 2)) ** 2 * np.exp(-t[:, None] ** 2 / 2)
    return x.shape[0] * np.trapezoid(integrand, t, axis=0)


def gaussian_floor(t_max=3.0):
    """E[T] for N(0, 1) samples: integral (1 - exp(-t^2)) exp(-t^2/2) dt (Var of exp(itX) is 1 - phi^2)."""
    t = np.linspace(-t_max, t_max, 20001)
    return np.trapezoid((1 - np.exp(-t**2)) * np.exp(-t**2 / 2), t)


def test_quick_start_runs_as_written():
    embeddings = torch.randn(256, 32, requires_grad=True)
    univariate_test = sigreg.EppsPulley(num_points=17)
    loss_fn = sigreg.SlicingUnivariateTest(univariate_test=univariate_test, num_slices=1024)
    loss = loss_fn(embeddings)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("num_points", [5, 17, 33])
def test_epps_pulley_matches_numpy_trapezoid(num_points):
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(500, 3, generator=gen, dtype=torch.float64),
                   torch.rand(500, 2, generator=gen, dtype=torch.float64) * 3 - 1], dim=1)
    ours = sigreg.EppsPulley(t_max=3.0, num_points=num_points)(x).numpy()
    np.testing.assert_allclose(ours, reference_statistic(x, 3.0, num_points), rtol=1e-10)


def test_epps_pulley_converges_to_the_integral():
    x = torch.randn(400, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.5 + 0.3
    ours = sigreg.EppsPulley(t_max=4.0, num_points=801)(x).numpy()
    np.testing.assert_allclose(ours, reference_statistic(x, 4.0), rtol=1e-6)


def test_fp32_agrees_with_float64_reference():
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(3)) * 1.2
    ours = sigreg.EppsPulley()(x)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference_statistic(x, 3.0, 17), rtol=1e-4)


def test_slicing_projects_on_the_returned_unit_slices():
    loss_fn = sigreg.SlicingUnivariateTest(sigreg.EppsPulley(), num_slices=6, reduction=None, seed=7)
    z = torch.randn(300, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    slices = loss_fn.slices(5, z.device, z.dtype)
    torch.testing.assert_close(slices.norm(dim=0), torch.ones(6, dtype=torch.float64))
    per_slice = loss_fn(z)  # (K,)
    np.testing.assert_allclose(per_slice.numpy(), reference_statistic((z @ slices).numpy(), 3.0, 17), rtol=1e-10)


def test_views_are_scored_separately_then_averaged():
    z = torch.randn(3, 200, 6, generator=torch.Generator().manual_seed(5))
    z[1] = z[1] * 2 + 1  # views with different distributions
    per_slice = sigreg.SlicingUnivariateTest(sigreg.EppsPulley(), 64, reduction=None)(z)
    assert per_slice.shape == (3, 64)
    for v in range(3):
        one = sigreg.SlicingUnivariateTest(sigreg.EppsPulley(), 64, reduction=None)(z[v])  # same seed, step 0
        torch.testing.assert_close(per_slice[v], one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sigreg.SIGReg(64)(z), per_slice.mean())
    total = sigreg.SlicingUnivariateTest(sigreg.EppsPulley(), 64, reduction="sum")(z)
    torch.testing.assert_close(total, per_slice.sum(-1).mean())


def test_gaussian_samples_sit_at_the_floor():
    floor = gaussian_floor(3.0)
    assert abs(floor - 1.0526) < 1e-3
    loss_fn = sigreg.SIGReg(num_slices=1024)
    gen = torch.Generator().manual_seed(6)
    values = [loss_fn(torch.randn(4096, 128, generator=gen)).item() for _ in range(4)]
    assert abs(np.mean(values) - floor) < 0.1, (values, floor)


@pytest.mark.parametrize("name", ["uniform", "bimodal", "shifted", "scaled", "low_rank"])
def test_non_gaussian_clouds_score_clearly_higher(name):
    gen = torch.Generator().manual_seed(7)
    N = 2048
    cloud = {
        "uniform": lambda: (torch.rand(N, 2, generator=gen) - 0.5) * 12**0.5,  # unit variance
        "bimodal": lambda: 0.5 * torch.randn(N, 4, generator=gen) + 0.87 * torch.randn(N, 1, generator=gen).sign(),
        "shifted": lambda: torch.randn(N, 16, generator=gen) + 1.0,
        "scaled": lambda: torch.randn(N, 16, generator=gen) * 2.0,
        "low_rank": lambda: torch.randn(N, 2, generator=gen) @ torch.randn(2, 16, generator=gen) * 0.7,
    }[name]()
    value = sigreg.SIGReg(num_slices=512)(cloud).item()
    assert value > 8 * gaussian_floor(3.0), value


def test_gradcheck_float64():
    x = torch.randn(24, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    slices = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert torch.autograd.gradcheck(lambda x: sigreg.EppsPulley()(x), (x,))
    assert torch.autograd.gradcheck(lambda x: sigreg.EppsPulley(t_max=5.0, num_points=9)(x @ slices), (x,))
    loss_fn = sigreg.SIGReg(num_slices=7)

    def fixed_slices(z):  # gradcheck calls many times: keep the slices of step 0
        loss_fn.step = 0
        return loss_fn(z)

    views = torch.randn(2, 16, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fixed_slices, (views,))


def test_bf16_autocast_gives_the_fp32_value_in_fp32():
    z = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(10))
    expected = sigreg.SIGReg(256)(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sigreg.SIGReg(256)(z)
        from_bf16 = sigreg.SIGReg(256)(z.bfloat16())  # bf16 activations are upcast, not used as is
    assert got.dtype == torch.float32 and from_bf16.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(from_bf16, sigreg.SIGReg(256)(z.bfloat16().float()), rtol=1e-5, atol=0)


def test_minimising_sigreg_makes_a_cloud_gaussian():
    # Uniform, anisotropic (std 0.87 to 0.014) and off-centre. (Start it inside the Gaussian's bulk:
    # with t <= 3 the statistic barely sees far-out points, so it does not pull in a wide start's tails.)
    gen = torch.Generator().manual_seed(11)
    points = ((torch.rand(512, 4, generator=gen) - 0.5) * torch.tensor([3.0, 1.0, 0.3, 0.05]) + 0.5).requires_grad_()
    loss_fn = sigreg.SIGReg(num_slices=128)
    before = loss_fn(points).item()
    opt = torch.optim.Adam([points], lr=0.03)
    for _ in range(300):
        opt.zero_grad()
        loss_fn(points).backward()
        opt.step()
    z = points.detach()
    cov = torch.cov(z.T)
    assert (cov - torch.eye(4)).abs().max() < 0.2, cov
    assert z.mean(0).abs().max() < 0.1
    after = np.mean([sigreg.SIGReg(1024, seed=s)(z).item() for s in range(3)])
    assert after < 2 * gaussian_floor(3.0) < before, (before, after)


def test_state_dict_round_trip_continues_the_slice_sequence():
    trained = sigreg.SIGReg(num_slices=32, seed=3)
    for _ in range(5):
        trained(torch.randn(16, 8))
    resumed = sigreg.SIGReg(num_slices=32, seed=0)
    resumed.load_state_dict(trained.state_dict())
    torch.testing.assert_close(resumed.slices(8, torch.device("cpu")), trained.slices(8, torch.device("cpu")))
    x = torch.randn(64, 8)
    torch.testing.assert_close(resumed(x), trained(x))
    assert not torch.equal(resumed.slices(8, torch.device("cpu")), sigreg.SIGReg(32, seed=3).slices(8, torch.device("cpu")))


def test_slices_are_new_each_call_and_reproducible():
    a, b = sigreg.SIGReg(16, seed=1), sigreg.SIGReg(16, seed=1)
    cpu = torch.device("cpu")
    first = a.slices(4, cpu)
    a(torch.randn(8, 4))
    assert not torch.allclose(first, a.slices(4, cpu))
    torch.testing.assert_close(first, b.slices(4, cpu))
    assert not torch.allclose(first, sigreg.SIGReg(16, seed=2).slices(4, cpu))


@pytest.mark.parametrize("make, call, match", [
    (lambda: sigreg.SIGReg(8), lambda f: f(torch.randn(1, 4)), "N >= 2"),
    (lambda: sigreg.SIGReg(8), lambda f: f(torch.randn(4)), r"\(\*, N, D\)"),
    (lambda: sigreg.EppsPulley(), lambda f: f(torch.randn(5)), r"\(\*, N, K\)"),
    (lambda: sigreg.EppsPulley(num_points=16), None, "odd"),
    (lambda: sigreg.EppsPulley(num_points=1), None, ">= 3"),
    (lambda: sigreg.EppsPulley(t_max=0), None, "t_max"),
    (lambda: sigreg.SIGReg(num_slices=0), None, "num_slices"),
    (lambda: sigreg.SlicingUnivariateTest(sigreg.EppsPulley(), 8, reduction="max"), None, "reduction"),
])
def test_bad_input_gets_a_clear_error(make, call, match):
    with pytest.raises(ValueError, match=match):
        f = make()
        call(f)


@pytest.mark.parametrize("collective", ["autograd", "no-autograd"])
def test_ddp_two_ranks_equal_one_process(tmp_path, collective):
    """Two gloo ranks, half a batch each, against one process on the whole batch (eager and torch.compile);
    also when the all-reduce has no autograd, as on torch before late 2025 (the gradient must not rely on it).
    Then one sample per rank against one process on the two: N >= 2 is a condition on the global batch."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           "--master_port=0", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
           os.path.join(HERE, "ddp_sigreg_worker.py"), str(tmp_path), collective]
    subprocess.run(cmd, env=env, check=True, timeout=240)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    from ddp_sigreg_worker import make_problem
    model, x = make_problem()
    loss_fn = sigreg.SIGReg(num_slices=64, seed=5)
    single = []
    for _ in range(3):  # three calls (the last compiled on the ranks): the slices move on in step everywhere
        model.zero_grad()
        loss = loss_fn(model(x))  # the whole batch: (V, 2N, D)
        loss.backward()
        single.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for r, got in enumerate(ranks):
        assert len(got["steps"]) == len(single)
        for (loss, grads), (loss_r, grads_r) in zip(single, got["steps"]):
            torch.testing.assert_close(loss_r, loss, rtol=1e-5, atol=0)
            for g, g_r in zip(grads, grads_r):
                torch.testing.assert_close(g_r, g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[0]["slices"], ranks[1]["slices"], rtol=0, atol=0)

    # one sample per rank: refused by neither, and the value of one process on those two samples
    model.zero_grad()
    loss = sigreg.SIGReg(num_slices=64, seed=5)(model(x[:, :2]))  # (V, 2, D): sample r from rank r
    loss.backward()
    for r, got in enumerate(ranks):
        loss_r, grads_r = got["one_sample"]
        torch.testing.assert_close(loss_r, loss.detach(), rtol=1e-5, atol=0)
        for p, g_r in zip(model.parameters(), grads_r):
            torch.testing.assert_close(g_r, p.grad, rtol=1e-4, atol=1e-6)
