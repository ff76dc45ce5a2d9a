"""SIGReg: Sketched Isotropic Gaussian Regularisation (LeJEPA, arXiv 2511.08544).

SIGReg pushes embeddings z (N samples, D dims) towards an isotropic Gaussian: it projects them on K random
unit directions a_k (the "slices", new each call), x_k = z @ a_k, and compares each 1-D sample's empirical
characteristic function (ECF) with N(0, 1)'s by the Epps-Pulley statistic:

    ecf_k(t) = 1/N sum_n exp(i t x_nk)                             (cos and sin means)
    T_k      = N * integral |ecf_k(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt  over [-t_max, t_max]
    SIGReg   = mean_k T_k          (for V views: computed per view, then averaged over views)

The integrand is even: trapezoid rule on M equally spaced knots of [0, t_max], weights doubled. Gaussian
samples give E[T_k] = integral (1 - exp(-t^2)) exp(-t^2/2) dt, about 1.05 at t_max = 3: the floor, not 0.
Cost O(N K M) time and memory (autograd keeps the (N, K, M) angles). bench/sigreg_bench.py measures an
angle-addition recurrence with a hand-written backward, O(N K) memory: ~1% of a ViT-L step on an H100.
DDP: the ECF is a mean over samples; its mean over ranks, with the global N, gives every rank the value of
one process on the whole batch (gradient: _GlobalMean). Ranks hold equal N and draw the same slices, from a
generator seeded by (seed, step); step counts calls and is saved in state_dict(). Precision: cos/sin means
of many samples lose digits in bf16, so this runs in fp32 (fp64 if given) with autocast disabled."""
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


class _GlobalMean(torch.autograd.Function):
    """Mean over the W ranks by a functional all-reduce (torch.compile traces it; "sum": gloo may lack "avg").
    The backward passes the gradient g through, exactly: every rank has the same loss from the same global
    ECF, so the same g; one process on the whole batch gives rank r's samples g/W * d ecf_r/dz, we give
    g * d ecf_r/dz, and DDP's mean supplies 1/W: no collective needs autograd (it had none till late 2025)."""
    @staticmethod
    def forward(ctx, x):
        return funcol.all_reduce(x, "sum", dist.group.WORLD) / dist.get_world_size()

    @staticmethod
    def backward(ctx, grad):
        return grad


class EppsPulley(torch.nn.Module):
    """Epps-Pulley statistic of each column: x (*, N, K) -> (*, K)."""
    def __init__(self, t_max=3.0, num_points=17):
        super().__init__()
        if num_points < 3 or num_points % 2 == 0 or t_max <= 0:
            raise ValueError(f"num_points must be odd and >= 3, t_max > 0; got {num_points}, {t_max}")
        self.t_max, self.num_points = float(t_max), int(num_points)

    def forward(self, x):
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if x.ndim < 2 or x.shape[-2] * world < 2:  # N counts the samples of all ranks
            raise ValueError(f"EppsPulley needs input (*, N, K) with N >= 2 samples, got {tuple(x.shape)}")
        with torch.autocast(x.device.type, enabled=False):  # cos/sin means lose digits in bf16
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
            t = torch.linspace(0, self.t_max, self.num_points, dtype=x.dtype, device=x.device)  # (M,)
            gauss = torch.exp(-t.square() / 2)  # characteristic function of N(0, 1), also the weight
            xt = x.unsqueeze(-1) * t  # (*, N, K, M)
            ecf = torch.stack([xt.cos().mean(-3), xt.sin().mean(-3)])  # (2, *, K, M): real, imaginary
            ecf = _GlobalMean.apply(ecf) if world > 1 else ecf  # the mean over every rank's samples
            err = (ecf[0] - gauss).square() + ecf[1].square()  # |ecf - phi|^2, (*, K, M)
            return 2 * x.shape[-2] * world * torch.trapezoid(err * gauss, t)  # global N * integral, (*, K)


class SlicingUnivariateTest(torch.nn.Module):
    """A univariate test on K random slices: x (*, N, D) -> scalar, or (*, K) for reduction=None."""
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
        # int-tuple hashes are alike in every process (unsalted); the CPU generator keeps a seed's low 32 bits
        gen = torch.Generator(device).manual_seed(hash((self.seed, self.step)) % 2**63)
        a = torch.randn(dim, self.num_slices, generator=gen, device=device, dtype=dtype)
        return a / a.norm(dim=0)

    def forward(self, x):
        if x.ndim < 2:
            raise ValueError(f"expected embeddings (*, N, D), got shape {tuple(x.shape)}")
        with torch.autocast(x.device.type, enabled=False):  # the projections in fp32 too
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            stats = self.univariate_test(x @ self.slices(x.shape[-1], x.device, x.dtype))  # (*, K)
        self.step += 1
        if self.reduction is None:
            return stats
        return (stats.mean(-1) if self.reduction == "mean" else stats.sum(-1)).mean()  # per view, then views

    def get_extra_state(self):  # saved in state_dict(): a resumed run continues the slice sequence
        return {"seed": self.seed, "step": self.step}

    def set_extra_state(self, state):
        self.seed, self.step = state["seed"], state["step"]


class SIGReg(SlicingUnivariateTest):
    """The LeJEPA regulariser: Epps-Pulley on `num_slices` random slices, averaged over slices and views."""
    def __init__(self, num_slices=1024, num_points=17, t_max=3.0, seed=0):
        super().__init__(EppsPulley(t_max, num_points), num_slices, "mean", seed)
