"""SIGReg: Sketched Isotropic Gaussian Regularisation (LeJEPA, arXiv 2511.08544).

SIGReg pushes the distribution of embeddings z (N samples, D dims) towards an isotropic Gaussian.
It draws K random unit directions a_k (the "slices", new each call), projects x_k = z @ a_k, and
scores each 1-D sample with the Epps-Pulley statistic, which compares its empirical characteristic
function (ECF) with that of N(0, 1):

    ecf_k(t) = 1/N sum_n exp(i t x_nk)                             (cos and sin means)
    T_k      = N * integral |ecf_k(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt  over [-t_max, t_max]
    SIGReg   = mean_k T_k          (for V views: computed per view, then averaged over views)

The integrand is even in t, so we integrate over [0, t_max] with the trapezoid rule on M equally
spaced knots t_j = j dt and double the weights. For exactly Gaussian samples E[T_k] is
integral (1 - exp(-t^2)) exp(-t^2/2) dt, about 1.05 at t_max = 3: that is the floor, not 0.

Implementation notes
- Cost is O(N K M) time and O(N K) memory: the (N, K, M) tensor of cos/sin is never stored.
  Equally spaced knots give exp(i t_j x) = exp(i dt x)^j, so one complex exponential per (n, k)
  and M-1 complex products replace M cos/sin pairs (angle-addition recurrence). The backward pass
  recomputes the projection and the powers (Horner's rule) instead of keeping them.
- DDP: the ECF is a mean over samples, so averaging it across ranks and using the global N gives
  every rank the value of one process on the concatenated batch. The gradient is a straight-through
  global mean (see _GlobalMean): exact, and independent of whether this torch's collectives have
  autograd (functional collectives had none before PyTorch PR 168140, late 2025).
  Every rank must hold the same number of samples and use the same slices: they come from a
  generator seeded by (seed, step), where step counts calls and lives in state_dict().
- Precision: the cos/sin means of many samples lose digits in bf16, so everything here runs in
  fp32 (or fp64 if given) with autocast disabled; the result is fp32.
"""
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


def _full_precision(x):  # bf16/fp16 -> fp32; fp32 and fp64 stay as they are
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _ProjectedECF(torch.autograd.Function):
    """ecf of the columns of x @ slices at knots j * dt, j < M.
    x: (*, N, D), slices: (D, K) -> (*, K, M, 2)."""

    @staticmethod
    def forward(ctx, x, slices, dt, M):
        ctx.save_for_backward(x, slices)  # (N, D) + (D, K): not the (N, K) projections, not (N, K, M)
        ctx.dt, ctx.M = dt, M
        proj = x @ slices  # (*, N, K)
        step = torch.polar(torch.ones_like(proj), dt * proj)  # exp(i dt x), (*, N, K) complex
        power, ecf = step.clone(), [torch.ones_like(step[..., 0, :])]  # exp(i t_0 x) = 1
        for _ in range(1, M):  # in-place products: 3x faster on CPU than allocating each power
            ecf.append(power.mean(-2))  # mean over samples of exp(i t_j x), (*, K)
            power.mul_(step)  # exp(i t_{j+1} x) = exp(i t_j x) exp(i dt x)
        return torch.view_as_real(torch.stack(ecf, -1))  # (*, K, M, 2): cos and sin means

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, slices = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            proj = x @ slices  # recomputed, (*, N, K)
            # d/dx of cos(t x) and sin(t x) give  dL/dx = Im( sum_j t_j g_j exp(-i t_j x) ) / N  with
            # g_j = dL/dcos_j + i dL/dsin_j: a polynomial in exp(-i dt x), evaluated by Horner's rule.
            t = torch.arange(ctx.M, device=x.device, dtype=x.dtype) * ctx.dt
            coef = torch.view_as_complex(grad.contiguous()) * t / proj.shape[-2]  # (*, K, M)
            coef = coef.transpose(-1, -2).unsqueeze(-2).contiguous()  # (*, M, 1, K)
            back = torch.polar(torch.ones_like(proj), -ctx.dt * proj)  # exp(-i dt x)
            acc = torch.zeros_like(back)
            for j in range(ctx.M - 1, 0, -1):
                acc.add_(coef[..., j, :, :]).mul_(back)
            grad_x = acc.imag @ slices.T  # (*, N, D)
        return grad_x, None, None, None


class _GlobalMean(torch.autograd.Function):
    """Mean of a tensor over all ranks; the backward passes the gradient through unchanged.

    Why that is exact: every rank computes the same loss L from the same global ECF, so the upstream
    gradient g = dL/d(global ECF) is identical on every rank. One process on the concatenated batch
    would give rank r's samples the gradient g * (1/W) * d ecf_r/dz; passing g straight through gives
    g * d ecf_r/dz, and DDP's average over the W ranks supplies the 1/W. No collective is needed in
    the backward, so no collective needs autograd."""

    @staticmethod
    def forward(ctx, x):
        # functional (traceable by torch.compile); "sum" then divide: older gloo builds have no "avg"
        return funcol.all_reduce(x, "sum", dist.group.WORLD) / dist.get_world_size()

    @staticmethod
    def backward(ctx, grad):
        return grad


class EppsPulley(nn.Module):
    """Epps-Pulley statistic per column: x (*, N, K) -> (*, K).

    forward(x, slices) scores the columns of x @ slices (slices: (D, K)) without storing them."""

    def __init__(self, t_max=3.0, num_points=17):
        super().__init__()
        if num_points < 3 or num_points % 2 == 0:
            raise ValueError(f"num_points must be odd and >= 3, got {num_points}")
        if t_max <= 0:
            raise ValueError(f"t_max must be positive, got {t_max}")
        self.t_max, self.num_points = float(t_max), int(num_points)

    def forward(self, x, slices=None):
        if x.ndim < 2 or x.shape[-2] < 2:
            raise ValueError(f"EppsPulley needs input (*, N, K) with N >= 2 samples, "
                             f"got shape {tuple(x.shape)}")
        with torch.autocast(x.device.type, enabled=False):  # cos/sin means lose digits in bf16
            x = _full_precision(x)
            if slices is None:  # the columns of x themselves
                slices = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
            slices = slices.to(x.dtype)
            M, N = self.num_points, x.shape[-2]
            t = torch.linspace(0, self.t_max, M, dtype=x.dtype, device=x.device)  # knots t_j
            trapezoid = torch.full_like(t, 2 * self.t_max / (M - 1))  # doubled: integrand is even
            trapezoid[0] /= 2  # int indices: a Python list index would be copied to the device (a host sync)
            trapezoid[-1] /= 2
            gauss = torch.exp(-t.square() / 2)  # characteristic function of N(0, 1) = the weight
            ecf = _ProjectedECF.apply(x, slices, self.t_max / (M - 1), M)  # (*, K, M, 2)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                ecf = _GlobalMean.apply(ecf)  # global mean (same N per rank)
                N = N * dist.get_world_size()
            err = (ecf[..., 0] - gauss).square() + ecf[..., 1].square()  # |ecf - phi|^2, (*, K, M)
            return N * (err @ (trapezoid * gauss))  # (*, K), fp32 (fp64 for fp64 input)


class SlicingUnivariateTest(nn.Module):
    """A univariate test on K random 1-D projections: x (*, N, D) -> scalar (reduction "mean"/"sum")
    or (*, K) (reduction None). Leading dims (views) are averaged: the per-view statistic, averaged."""

    def __init__(self, univariate_test, num_slices=1024, reduction="mean", seed=0):
        super().__init__()
        if num_slices <= 0:
            raise ValueError(f"num_slices must be positive, got {num_slices}")
        if reduction not in ("mean", "sum", None):
            raise ValueError(f'reduction must be "mean", "sum" or None, got {reduction!r}')
        self.univariate_test, self.num_slices, self.reduction = univariate_test, int(num_slices), reduction
        self.seed, self.step = int(seed), 0  # slices of call `step` depend only on (seed, step)

    def slices(self, dim, device, dtype=torch.float32):
        """The (dim, K) unit directions of the next call: the same on every rank, no host sync."""
        # tuple hashes of ints are the same in every process, and they mix into the low 32 bits that the
        # CPU generator uses
        gen = torch.Generator(device).manual_seed(hash((self.seed, self.step)) % 2**63)
        a = torch.randn(dim, self.num_slices, generator=gen, device=device, dtype=dtype)
        return a / a.norm(dim=0)

    def forward(self, x):
        if x.ndim < 2:
            raise ValueError(f"expected embeddings (*, N, D), got shape {tuple(x.shape)}")
        x = _full_precision(x)
        stats = self.univariate_test(x, self.slices(x.shape[-1], x.device, x.dtype))  # (*, K)
        self.step += 1
        if self.reduction is None:
            return stats
        per_view = stats.mean(-1) if self.reduction == "mean" else stats.sum(-1)  # (*,)
        return per_view.mean()

    def get_extra_state(self):  # saved in state_dict(): a resumed run continues the slice sequence
        return {"seed": self.seed, "step": self.step}

    def set_extra_state(self, state):
        self.seed, self.step = state["seed"], state["step"]


class SIGReg(SlicingUnivariateTest):
    """The LeJEPA regulariser: Epps-Pulley on `num_slices` random slices, averaged over slices and views."""

    def __init__(self, num_slices=1024, num_points=17, t_max=3.0, seed=0):
        super().__init__(EppsPulley(t_max, num_points), num_slices, "mean", seed)
