"""GroupMixNorm: mix the feature statistics of protected groups (arXiv 2312.11969).

During fine-tuning each sample of group i is re-standardized with a mixture of its own
group's statistics and those of a random other group j:
``σ_mix · (x − μ_i) / σ_i + μ_mix`` with ``μ_mix = λμ_i + (1−λ)μ_j`` and
``σ_mix = λσ_i + (1−λ)σ_j``, λ ~ Beta(α, α). The network learns features whose group
statistics carry no information about the group. At inference the protected attribute
is not available, so the eval-mode layer is a per-feature affine map that can be folded
into the preceding Linear/Conv/BatchNorm (see :mod:`gmn_debias.hooks`).

Why a hand-written autograd Function: per sample the output is affine in x,
``y = x + w·(R·x + D)`` with ``w = 1−λ`` and (R, D) depending only on the (own, partner)
cell pair, so forward and backward need two per-cell reductions each plus a few
elementwise passes. Composing it from autograd ops costs about 10x a BatchNorm.
Gradients flow through the group statistics on purpose: detaching them (as MixStyle
does) removed the fairness effect in our experiments.

Defined edge cases (never NaN): a cell ((group) or (group, label) for ``target="eo"``)
with fewer than 2 samples in the batch is passed through unchanged and is never chosen
as a partner; a sample whose cell has no eligible partner is passed through; so a batch
with one group, or of size 1, is returned unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .errors import UserError

INFERENCE_MODES = ("identity", "running")
TARGETS = ("dp", "eo")


def _sum_by(index: Tensor, src: Tensor, size: int) -> Tensor:
    """(size, C) sums of the rows of src (N, C) that share an index: one pass, no loop.

    scatter_add_ rather than index_add_: on CPU the latter synchronizes threads per row
    and is up to 100x slower when other processes compete for the cores.
    """
    return src.new_zeros(size, src.shape[1]).scatter_add_(0, index[:, None].expand_as(src), src)


def _per_sample(t: Tensor) -> Tensor:
    """(N, C, S) -> (N, C): sum over spatial positions (a view when S == 1)."""
    return t[:, :, 0] if t.shape[2] == 1 else t.sum(2)


class _GroupMix(torch.autograd.Function):
    """``y = a·x + b`` with ``a = 1 + w·R[p]``, ``b = w·D[p]``; statistics computed inside.

    x: (N, C, S); cell: (N,) cell of each sample in [0, num_cells); pair_inv: (N,) index
    of each sample's (own, partner) cell pair; pair_cells: (P, 2); w: (N,) weight 1−λ
    (0 for samples passed through). R = σ_j/σ_i − 1 and D = μ_j − (σ_j/σ_i)·μ_i per pair.
    Large temporaries are reused in place: on CPU each fresh (N, C) buffer costs page faults.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cell: Tensor, pair_inv: Tensor, pair_cells: Tensor,
                w: Tensor, eps: float, num_cells: int) -> Tensor:  # type: ignore[override]
        n, n_feat, spatial = x.shape
        count = (torch.bincount(cell, minlength=num_cells).to(x.dtype) * spatial).clamp_min_(1)[:, None]
        # Sums about one sample's values: unshifted float32 sums lose the mean to rounding and
        # E[x²] − E[x]² cancels catastrophically when |mean| >> std.
        shift = x[0, :, 0]
        buf = x - shift[:, None]
        s1 = _sum_by(cell, _per_sample(buf), num_cells)
        s2 = _sum_by(cell, _per_sample(buf.square_()), num_cells)
        centred = s1.div_(count)
        std = s2.div_(count).sub_(centred * centred).clamp_min_(0).add_(eps).sqrt_()
        mean = centred.add_(shift)
        own, partner = pair_cells[:, 0], pair_cells[:, 1]
        inv_std_own = std.index_select(0, own).reciprocal_()
        ratio = std.index_select(0, partner).mul_(inv_std_own)             # σ_j / σ_i
        mean_own = mean.index_select(0, own)
        d_tab = mean.index_select(0, partner).sub_(ratio * mean_own)        # D
        # y = x + w·(R·x + D) and, for backward, a = ∂y/∂x|stats = 1 + w·R.
        r = torch.index_select(ratio - 1, 0, pair_inv, out=buf.view(n, n_feat) if spatial == 1 else None)
        y = d_tab.index_select(0, pair_inv).unsqueeze(2)
        y = y.addcmul_(r.unsqueeze(2), x) if spatial == 1 else torch.addcmul(y, r.unsqueeze(2), x)
        torch.addcmul(x, w[:, None, None], y, out=y)
        a = torch.addcmul(torch.ones((), dtype=x.dtype, device=x.device), w[:, None], r, out=r)
        ctx.save_for_backward(x, a, cell, pair_inv, own, partner, w, count, mean, std,
                              inv_std_own, ratio, mean_own)
        ctx.num_cells = num_cells
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x, a, cell, pair_inv, own, partner, w, count, mean, std,
         inv_std_own, ratio, mean_own) = ctx.saved_tensors
        num_cells, n_pairs = ctx.num_cells, own.shape[0]
        tmp = grad * w[:, None, None]
        d_shift = _sum_by(pair_inv, _per_sample(tmp), n_pairs)
        d_r = _sum_by(pair_inv, _per_sample(tmp.mul_(x)), n_pairs)
        # Chain rule from the pair tables (R, D) to the per-cell mean and std.
        d_ratio = d_r.sub_(mean_own * d_shift).mul_(inv_std_own)
        d_mean = _sum_by(partner, d_shift, num_cells).sub_(_sum_by(own, d_shift.mul_(ratio), num_cells))
        d_std = _sum_by(partner, d_ratio, num_cells).sub_(_sum_by(own, d_ratio.mul_(ratio), num_cells))
        # σ = sqrt(E[x²] − μ² + eps): dx = dμ/n + 2·dvar·(x − μ)/n = c1 + c2·x per cell.
        c2 = d_std.div_(std).div_(count)
        c1 = d_mean.div_(count).sub_(c2 * mean)
        dx = torch.mul(grad, a.unsqueeze(2), out=tmp)
        per_cell = c2.index_select(0, cell)
        dx.addcmul_(per_cell.unsqueeze(2), x)
        dx.add_(torch.index_select(c1, 0, cell, out=per_cell).unsqueeze(2))
        return dx, None, None, None, None, None, None


def _compact(key: Tensor, size: int, dense_up_to: int) -> tuple[Tensor, Tensor]:
    """Map ids in [0, size) to dense indices; returns (index per element, id per index).

    Id spaces up to ``dense_up_to`` are used as they are (no sort, some unused ids);
    larger ones go through unique, so tables stay no larger than the batch.
    """
    if size <= dense_up_to:
        return key, torch.arange(size, device=key.device)
    uniq, inv = torch.unique(key, return_inverse=True)
    return inv, uniq


class GroupMixNorm(nn.Module):
    """Mix per-group feature statistics across protected groups while training.

    Args:
        num_features: C of an input (N, C) or (N, C, *).
        alpha: Beta(α, α) concentration of the mixing weight λ (large α → λ ≈ 0.5,
            tiny α → λ ≈ 0 or 1, i.e. little mixing).
        p: probability that a sample is mixed at all.
        eps: added to the variances.
        momentum: running-statistics momentum (None: cumulative average), as in BatchNorm.
        inference: "identity" (eval output = input) or "running" (eval output = the
            per-feature least-squares affine fit of the training output on the input).
        target: "dp" mixes across groups; "eo" mixes only within a label: statistics
            per (group, label) cell, partner a different group with the same label.
        generator: torch.Generator for the random draws (None: the global RNG).
    """

    def __init__(self, num_features: int, *, alpha: float = 0.5, p: float = 1.0, eps: float = 1e-5,
                 momentum: float | None = 0.1, inference: str = "identity", target: str = "dp",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise UserError(f"GroupMixNorm num_features must be a positive integer, got {num_features!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise UserError(f"GroupMixNorm alpha must be a finite number > 0, got {alpha!r}")
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise UserError(f"GroupMixNorm p (mixing probability) must be in [0, 1], got {p!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise UserError(f"GroupMixNorm eps must be > 0, got {eps!r}")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
            raise UserError(f"GroupMixNorm momentum must be in [0, 1] or None, got {momentum!r}")
        if inference not in INFERENCE_MODES:
            raise UserError(f"GroupMixNorm inference must be one of {', '.join(INFERENCE_MODES)}, got {inference!r}")
        if target not in TARGETS:
            raise UserError(f"GroupMixNorm target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.num_features = num_features
        self.alpha = float(alpha)
        self.p = float(p)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.inference = inference
        self.target = target
        self.generator = generator
        # Registered in both inference modes so the state_dict does not depend on the mode.
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("running_out_mean", torch.zeros(num_features))
        self.register_buffer("running_cov", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        """Forget the running statistics (eval map back to identity)."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.running_out_mean.zero_()
        self.running_cov.fill_(1)
        self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha={self.alpha}, p={self.p}, eps={self.eps}, "
                f"momentum={self.momentum}, inference={self.inference!r}, target={self.target!r}")

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """(scale, shift), each (C,) float32: the eval-mode map ``y = scale·x + shift``.

        "running": least-squares fit of training outputs on inputs,
        ``scale = Cov(x, y) / (Var x + eps)``; identity until a batch has been tracked.
        """
        ones = torch.ones_like(self.running_mean, dtype=torch.float32)
        zeros = torch.zeros_like(ones)
        if self.inference == "identity" or int(self.num_batches_tracked) == 0:
            return ones, zeros
        scale = self.running_cov.float() / (self.running_var.float() + self.eps)
        shift = self.running_out_mean.float() - scale * self.running_mean.float()
        return scale, shift

    def forward(self, x: Tensor, groups: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"GroupMixNorm expects input (N, {self.num_features}, *), got {tuple(x.shape)}")
        if not self.training:
            return self._eval_forward(x)
        if groups is None:
            raise ValueError("GroupMixNorm in training mode needs groups (an integer tensor (N,))")
        if x.shape[0] == 0 or x.numel() == 0:
            return x
        cell, n_cells, cell_label = self._cells(x, groups, labels)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(compute).reshape(x.shape[0], x.shape[1], -1)
        pair_inv, pair_cells, w = self._draw_partners(cell, n_cells, cell_label, compute)
        if pair_cells is None:
            y = xf
        else:
            y = _GroupMix.apply(xf.contiguous(), cell, pair_inv, pair_cells, w, self.eps, n_cells)
        if self.inference == "running":
            self._track(xf, y)
        return y.reshape(x.shape).to(x.dtype)

    def _eval_forward(self, x: Tensor) -> Tensor:
        if self.inference == "identity":
            return x
        scale, shift = self.eval_affine()
        view = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(view), scale.view(view), x.float()).to(x.dtype)

    def _cells(self, x: Tensor, groups: Tensor, labels: Tensor | None) -> tuple[Tensor, int, Tensor]:
        """Cell id per sample (group, or (group, label) for "eo"), number of cells, label per cell."""
        n = x.shape[0]
        groups = self._check_ids(groups, n, "groups", x.device)
        if self.target == "eo":
            if labels is None:
                raise ValueError('GroupMixNorm with target="eo" needs labels (an integer tensor (N,))')
            labels = self._check_ids(labels, n, "labels", x.device)
        else:
            labels = torch.zeros_like(groups)
        n_groups = int(groups.max()) + 1 if n else 1
        n_labels = int(labels.max()) + 1 if n else 1
        # Label-major ids: the cells of one label are contiguous, which _draw_partners relies on.
        cell, ids = _compact(labels * n_groups + groups, n_labels * n_groups, max(n, 64))
        return cell, ids.numel(), ids // n_groups

    @staticmethod
    def _check_ids(ids: Tensor, n: int, what: str, device: torch.device) -> Tensor:
        if ids.shape != (n,) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"GroupMixNorm {what} must be an integer tensor of shape ({n},), "
                             f"got {ids.dtype} {tuple(ids.shape)}")
        ids = ids.to(device=device, dtype=torch.long)
        if n and int(ids.min()) < 0:
            raise ValueError(f"GroupMixNorm {what} must be >= 0")
        return ids

    def _random(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Uniforms for the partner choice and for p, and λ ~ Beta(α, α), drawn in a fixed order."""
        gen_device = self.generator.device if self.generator is not None else device
        u = torch.rand(4, n, generator=self.generator, device=gen_device, dtype=torch.float64)
        gamma = torch._standard_gamma(torch.full((2, n), self.alpha + 1.0, device=gen_device, dtype=torch.float64),
                                      generator=self.generator)
        # Gamma(α) = Gamma(α+1)·U^(1/α), in logs so that tiny α does not underflow to 0/0.
        log_g = gamma.log() + torch.log1p(-u[2:]) / self.alpha
        lam = torch.sigmoid(log_g[0] - log_g[1])
        return u[0].to(device), u[1].to(device), lam.to(device=device, dtype=dtype)

    def _draw_partners(self, cell: Tensor, n_cells: int, cell_label: Tensor,
                       dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
        """For each sample, a partner cell (different group, same label) and the weight 1−λ.

        Returns (pair index per sample, (P, 2) own/partner cells, w); pair cells are None
        when no sample is mixed.
        """
        n = cell.shape[0]
        u_partner, u_mix, lam = self._random(n, cell.device, dtype)
        no_mix = torch.zeros_like(lam)
        elig_cells = (torch.bincount(cell, minlength=n_cells) >= 2).nonzero().squeeze(1)  # label-major
        if elig_cells.numel() < 2:
            return cell, None, no_mix
        elig_label = cell_label.index_select(0, elig_cells)
        first = torch.searchsorted(elig_label, elig_label)  # where each label's block starts
        per_cell = torch.zeros(3, n_cells, dtype=torch.long, device=cell.device)
        per_cell[0] = -1
        per_cell[:, elig_cells] = torch.stack([
            torch.arange(elig_cells.numel(), device=cell.device) - first,          # rank in its block
            first,
            torch.searchsorted(elig_label, elig_label, right=True) - first,       # block size
        ])
        rank, start, choices = per_cell.index_select(1, cell)
        mixed = (rank >= 0) & (choices >= 2) & (u_mix < self.p)
        # Uniform among the other eligible cells of the label: draw from m − 1, skip the own cell.
        pick = torch.minimum((u_partner * (choices - 1)).long(), choices - 2).clamp_min(0)
        pick += pick >= rank
        other = elig_cells.index_select(0, (start + pick).clamp(max=elig_cells.numel() - 1))
        partner = torch.where(mixed, other, cell)
        w = torch.where(mixed, 1.0 - lam, no_mix)
        if not bool(mixed.any()):
            return cell, None, w
        pair_inv, pair_ids = _compact(cell * n_cells + partner, n_cells * n_cells, n // 8)
        pair_cells = torch.stack([pair_ids // n_cells, pair_ids % n_cells], dim=1)
        return pair_inv, pair_cells, w

    @torch.no_grad()
    def _track(self, x: Tensor, y: Tensor) -> None:
        """BatchNorm-style running E[x], Var x, E[y], Cov(x, y) for the least-squares eval map.

        x, y: (N, C, S). The first tracked batch replaces the placeholder buffers outright.
        """
        xd, yd = x.detach().float(), y.detach().float()
        var, mean_x = torch.var_mean(xd, dim=(0, 2), correction=0)
        mean_y = yd.mean((0, 2))
        cov = torch.einsum("ncs,ncs->c", xd - mean_x[:, None], yd) / (x.shape[0] * x.shape[2])
        self.num_batches_tracked += 1
        tracked = int(self.num_batches_tracked)
        factor = 1.0 if tracked == 1 else (1.0 / tracked if self.momentum is None else self.momentum)
        for buf, new in ((self.running_mean, mean_x), (self.running_var, var),
                         (self.running_out_mean, mean_y), (self.running_cov, cov)):
            buf.lerp_(new.to(buf.dtype), factor)
