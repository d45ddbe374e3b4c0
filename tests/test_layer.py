"""GroupMixNorm against independent references: numpy loops, autograd, least squares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmn_debias.errors import UserError
from gmn_debias.layer import GroupMixNorm


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plan(x: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0,
          **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(own cell, partner cell, λ) per sample as a layer seeded ``seed`` draws them."""
    layer = GroupMixNorm(x.shape[1], generator=_gen(seed), **kw)
    cell, n_cells, cell_label = layer._cells(x, groups, labels)
    pair_inv, pair_cells, w = layer._draw_partners(cell, n_cells, cell_label, torch.float64)
    partner = cell if pair_cells is None else pair_cells[pair_inv, 1]
    return cell.numpy(), partner.numpy(), 1.0 - w.double().numpy()


def _numpy_reference(x: np.ndarray, cells: np.ndarray, partner: np.ndarray, lam: np.ndarray,
                     eps: float = 1e-5) -> np.ndarray:
    """The paper's formula with statistics from a slow loop over groups (float64)."""
    xs = x.reshape(x.shape[0], x.shape[1], -1).astype(np.float64)
    stats = {}
    for c in np.unique(cells):
        member = xs[cells == c].transpose(1, 0, 2).reshape(x.shape[1], -1)
        stats[c] = (member.mean(axis=1), np.sqrt(member.var(axis=1) + eps))
    out = np.empty_like(xs)
    for n in range(x.shape[0]):
        (mu_i, sd_i), (mu_j, sd_j) = stats[cells[n]], stats[partner[n]]
        mu_mix = lam[n] * mu_i + (1 - lam[n]) * mu_j
        sd_mix = lam[n] * sd_i + (1 - lam[n]) * sd_j
        out[n] = sd_mix[:, None] * (xs[n] - mu_i[:, None]) / sd_i[:, None] + mu_mix[:, None]
    return out.reshape(x.shape)


@pytest.mark.parametrize("shape", [(60, 5), (30, 4, 3, 2)])
def test_output_matches_numpy_loop_reference(shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64) * torch.linspace(0.5, 3, shape[1]).view(1, -1, *[1] * (len(shape) - 2))
    groups = torch.randint(0, 4, (shape[0],))
    cells, partner, lam = _plan(x, groups, seed=3)
    assert (partner != cells).mean() > 0.9  # the test really mixes
    y = GroupMixNorm(shape[1], generator=_gen(3)).double()(x, groups)
    np.testing.assert_allclose(y.numpy(), _numpy_reference(x.numpy(), cells, partner, lam), atol=1e-6, rtol=0)


def test_float32_statistics_survive_a_large_offset() -> None:
    """Var = E[x²] − E[x]² cancels in float32 unless shifted; the layer must stay accurate."""
    torch.manual_seed(2)
    x = torch.randn(512, 8) * 0.5 + 1000.0
    groups = torch.randint(0, 3, (512,))
    cells, partner, lam = _plan(x.double(), groups, seed=5)
    y = GroupMixNorm(8, generator=_gen(5))(x, groups)
    ref = _numpy_reference(x.double().numpy(), cells, partner, lam)
    np.testing.assert_allclose(y.double().numpy(), ref, atol=2e-3, rtol=0)  # float32 ulp at 1000 is 6e-5


def test_huge_alpha_gives_both_groups_the_average_statistics() -> None:
    torch.manual_seed(3)
    n = 2000
    groups = torch.arange(n) % 2
    x = torch.where(groups[:, None] == 0, torch.randn(n, 3), 3.0 + 2.0 * torch.randn(n, 3)).double()
    y = GroupMixNorm(3, alpha=1e9, generator=_gen(0)).double()(x, groups)
    xn, yn = x.numpy(), y.numpy()
    g0, g1 = groups.numpy() == 0, groups.numpy() == 1
    np.testing.assert_allclose(yn[g0].mean(0), yn[g1].mean(0), atol=1e-3)
    np.testing.assert_allclose(yn[g0].std(0), yn[g1].std(0), atol=1e-3)
    np.testing.assert_allclose(yn[g0].mean(0), (xn[g0].mean(0) + xn[g1].mean(0)) / 2, atol=1e-3)
    np.testing.assert_allclose(yn[g0].std(0), (xn[g0].std(0) + xn[g1].std(0)) / 2, atol=1e-3)


def test_tiny_alpha_gives_lambda_zero_or_one() -> None:
    torch.manual_seed(4)
    n = 400
    groups = torch.arange(n) % 2
    x = torch.where(groups[:, None] == 0, torch.randn(n, 4), 5.0 + 3.0 * torch.randn(n, 4)).double()
    y = GroupMixNorm(4, alpha=1e-6, generator=_gen(1)).double()(x, groups)
    cells, partner, _ = _plan(x, groups, seed=1)
    full_swap = _numpy_reference(x.numpy(), cells, partner, np.zeros(n))
    kept = np.abs(y.numpy() - x.numpy()).max(1) < 1e-3
    swapped = np.abs(y.numpy() - full_swap).max(1) < 1e-3
    assert np.all(kept | swapped)
    assert 0.3 < kept.mean() < 0.7  # Beta(α, α) with tiny α: λ is 0 or 1 with equal odds


@pytest.mark.parametrize("alpha", [0.05, 0.5, 3.0])
def test_lambda_follows_scipy_beta(alpha: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    layer = GroupMixNorm(1, alpha=alpha, generator=_gen(0))
    lam = layer._random(20000, torch.device("cpu"), torch.float64)[2].numpy()
    beta = stats.beta(alpha, alpha)
    for q in (1e-3, 0.1, 0.3, 0.5):  # CDF at a few points, within 4 binomial standard errors
        expected = beta.cdf(q)
        assert abs((lam <= q).mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / lam.size) + 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_partner_is_another_eligible_group(seed: int) -> None:
    torch.manual_seed(seed)
    groups = torch.randint(0, 9, (3000,))
    groups[:3] = torch.tensor([20, 21, 21])  # 20: one member (not eligible); 21: two
    cells, partner, _ = _plan(torch.randn(3000, 2), groups, seed=seed)
    sizes = np.bincount(cells)
    mixed = partner != cells
    assert mixed[sizes[cells] >= 2].all()
    assert not mixed[sizes[cells] < 2].any()
    assert (sizes[partner[mixed]] >= 2).all()
    # uniform among the other present groups: every other group is drawn for group 0
    assert set(partner[(cells == 0) & mixed]) == {c for c in np.flatnonzero(sizes >= 2) if c != 0}


def test_eo_partner_has_the_same_label_and_another_group() -> None:
    torch.manual_seed(6)
    n = 600
    groups, labels = torch.randint(0, 5, (n,)), torch.randint(0, 2, (n,))
    layer = GroupMixNorm(2, target="eo", generator=_gen(0))
    cell, n_cells, cell_label = layer._cells(torch.zeros(n, 2), groups, labels)
    pair_inv, pair_cells, _ = layer._draw_partners(cell, n_cells, cell_label, torch.float32)
    partner = pair_cells[pair_inv, 1]
    n_groups = int(groups.max()) + 1
    assert torch.equal(partner // n_groups, labels)      # same label
    assert bool((partner % n_groups != groups).all())    # different group


def test_eo_never_mixes_statistics_across_labels() -> None:
    torch.manual_seed(7)
    n = 800
    groups = torch.randint(0, 3, (n,))
    labels = (torch.rand(n) < 0.2 + 0.3 * groups).long()  # groups differ in their label mix
    x = torch.randn(n, 4) + 100.0 * labels[:, None]
    y_eo = GroupMixNorm(4, target="eo", generator=_gen(0))(x, groups, labels=labels)
    assert y_eo[labels == 0].abs().max() < 10  # label-0 rows never take label-1 statistics
    y_dp = GroupMixNorm(4, target="dp", generator=_gen(0))(x, groups)
    assert y_dp[labels == 0].abs().max() > 10  # whereas dp mixes groups whose label mix differs
    with pytest.raises(ValueError, match="labels"):
        GroupMixNorm(4, target="eo")(x, groups)


def test_edge_cases_pass_through_and_stay_finite() -> None:
    torch.manual_seed(8)
    layer = GroupMixNorm(3, generator=_gen(0))
    x = torch.randn(10, 3)
    assert torch.equal(layer(x, torch.zeros(10, dtype=torch.long)), x)            # one group
    one = torch.randn(1, 3)
    assert torch.equal(layer(one, torch.tensor([4])), one)                         # batch size 1
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 3])                          # 2 and 3: one member
    y = layer(x, groups)
    assert torch.equal(y[8:], x[8:])
    assert not torch.allclose(y[:8], x[:8])
    constant = torch.ones(8, 3)                                                    # zero variance
    assert torch.isfinite(layer(constant, torch.arange(8) % 2)).all()
    eo = GroupMixNorm(3, target="eo", generator=_gen(0))                           # no same-label partner
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0, 1, 1])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    y = eo(x, g, labels=labels)
    assert torch.isfinite(y).all() and not torch.equal(y, x)
    assert torch.equal(eo(x, torch.tensor([0] * 5 + [1] * 5), labels=torch.tensor([0] * 5 + [1] * 5)), x)
    empty = torch.zeros(0, 3)
    assert layer(empty, torch.zeros(0, dtype=torch.long)).shape == (0, 3)


def test_sparse_large_group_ids_equal_compact_ids() -> None:
    torch.manual_seed(9)
    x = torch.randn(50, 3)
    compact = torch.randint(0, 4, (50,))
    sparse = torch.tensor([7, 12, 100_003, 5_000_000])[compact]  # same order as the compact ids
    y1 = GroupMixNorm(3, generator=_gen(2))(x, compact)
    y2 = GroupMixNorm(3, generator=_gen(2))(x, sparse)
    assert torch.equal(y1, y2) and not torch.equal(y1, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_uses_float32_statistics(dtype: torch.dtype) -> None:
    torch.manual_seed(10)
    x = (torch.randn(256, 6) * 3 + 20).to(dtype)
    groups = torch.randint(0, 3, (256,))
    y = GroupMixNorm(6, generator=_gen(0))(x, groups)
    ref = GroupMixNorm(6, generator=_gen(0))(x.float(), groups)
    assert y.dtype == dtype and torch.isfinite(y).all()
    tol = 0.1 if dtype == torch.float16 else 0.5  # one output ulp at |y| ≈ 30
    assert (y.float() - ref).abs().max() <= tol


def test_seeded_generator_is_reproducible() -> None:
    x, groups = torch.randn(64, 4), torch.randint(0, 3, (64,))
    a = GroupMixNorm(4, generator=_gen(11))(x, groups)
    b = GroupMixNorm(4, generator=_gen(11))(x, groups)
    c = GroupMixNorm(4, generator=_gen(12))(x, groups)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = GroupMixNorm(4)(x, groups)
    torch.manual_seed(5)
    assert torch.equal(d, GroupMixNorm(4)(x, groups))


def test_mixing_probability() -> None:
    x, groups = torch.randn(400, 2), torch.arange(400) % 4
    assert torch.equal(GroupMixNorm(2, p=0.0, generator=_gen(0))(x, groups), x)
    y = GroupMixNorm(2, p=0.3, generator=_gen(0))(x, groups)
    changed = (y - x).abs().max(1).values > 1e-6
    assert 0.2 < changed.float().mean() < 0.4


@pytest.mark.parametrize("shape", [(14, 3), (10, 2, 3)])
def test_gradcheck_float64(shape: tuple[int, ...]) -> None:
    torch.manual_seed(12)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 0, 1, 2, 2, 0][: shape[0]])
    layer = GroupMixNorm(shape[1], alpha=0.7, generator=_gen(0)).double()

    def run(inp: torch.Tensor) -> torch.Tensor:
        layer.generator.manual_seed(0)
        return layer(inp, groups)

    assert torch.autograd.gradcheck(run, (x,))


def test_gradient_matches_autograd_of_the_formula_and_flows_through_statistics() -> None:
    torch.manual_seed(13)
    x = torch.randn(80, 5, dtype=torch.float64, requires_grad=True)
    groups = torch.randint(0, 5, (80,))
    cells, partner, lam = (torch.as_tensor(a) for a in _plan(x.detach(), groups, seed=4))
    y = GroupMixNorm(5, generator=_gen(4)).double()(x, groups)
    means = torch.stack([x[cells == c].mean(0) for c in range(5)])
    stds = torch.stack([(x[cells == c].var(0, unbiased=False) + 1e-5).sqrt() for c in range(5)])
    lam = lam[:, None]
    mu_mix = lam * means[cells] + (1 - lam) * means[partner]
    sd_mix = lam * stds[cells] + (1 - lam) * stds[partner]
    ref = sd_mix * (x - means[cells]) / stds[cells] + mu_mix
    grad = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(y, x, grad)
    (gref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(gx, gref, atol=1e-10, rtol=1e-8)
    # detached statistics would give only the per-sample slope σ_mix/σ_i
    detached = grad * (sd_mix / stds[cells]).detach()
    assert (gx - detached).abs().max() > 1e-3


def test_no_grad_and_eval_identity() -> None:
    layer = GroupMixNorm(3, generator=_gen(0))
    x, groups = torch.randn(20, 3), torch.arange(20) % 2
    with torch.no_grad():
        assert not torch.equal(layer(x, groups), x)
    layer.eval()
    assert layer(x) is x
    scale, shift = layer.eval_affine()
    assert torch.equal(scale, torch.ones(3)) and torch.equal(shift, torch.zeros(3))
    with pytest.raises(ValueError, match="groups"):
        layer.train()(x)


def test_running_inference_is_the_least_squares_fit() -> None:
    torch.manual_seed(14)
    layer = GroupMixNorm(4, inference="running", momentum=0.25, generator=_gen(0))
    assert torch.equal(layer.eval_affine()[0], torch.ones(4))  # nothing tracked yet: identity
    fits = []
    for _ in range(2):
        groups = torch.randint(0, 2, (300,))
        x = torch.randn(300, 4) + 2.0 * groups[:, None]
        y = layer(x, groups)
        xn, yn = x.double().numpy(), y.detach().double().numpy()
        xc = xn - xn.mean(0)
        fits.append((xn.mean(0), (xc**2).mean(0), yn.mean(0), (xc * (yn - yn.mean(0))).mean(0)))
    blended = [0.75 * a + 0.25 * b for a, b in zip(*fits)]  # first batch taken whole, then momentum
    mean, var, out_mean, cov = blended
    scale, shift = layer.eval_affine()
    np.testing.assert_allclose(scale.numpy(), cov / (var + 1e-5), rtol=1e-4)
    np.testing.assert_allclose(shift.numpy(), out_mean - scale.double().numpy() * mean, atol=1e-4)
    assert (scale < 0.95).all()  # mixing removed the group difference: features shrink
    x = torch.randn(7, 4)
    torch.testing.assert_close(layer.eval()(x), x * scale + shift)
    # identical groups: output is the input, the fit is the identity
    same = GroupMixNorm(2, inference="running", generator=_gen(0))
    same(torch.randn(100, 2), torch.zeros(100, dtype=torch.long))
    torch.testing.assert_close(same.eval_affine()[0], torch.ones(2), atol=1e-4, rtol=0)


def test_state_dict_round_trip_and_repr() -> None:
    a = GroupMixNorm(3, alpha=0.3, inference="running", generator=_gen(0))
    a(torch.randn(40, 3, 2, 2), torch.arange(40) % 3)
    b = GroupMixNorm(3, alpha=0.3, inference="identity")
    assert set(a.state_dict()) == set(b.state_dict())
    b.inference = "running"
    b.load_state_dict(a.state_dict())
    for u, v in zip(a.eval_affine(), b.eval_affine()):
        assert torch.equal(u, v)
    assert "alpha=0.3" in repr(a) and "inference='running'" in repr(a)
    a.reset_running_stats()
    assert torch.equal(a.eval_affine()[0], torch.ones(3))


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0}, "alpha"), ({"p": 1.5}, "p "), ({"inference": "batch"}, "inference"),
    ({"target": "x"}, "target"), ({"eps": -1.0}, "eps"), ({"momentum": 2.0}, "momentum"),
])
def test_bad_settings_are_user_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        GroupMixNorm(3, **kwargs)


def test_bad_group_tensors_are_rejected() -> None:
    layer = GroupMixNorm(2)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        layer(torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=">= 0"):
        layer(torch.randn(4, 2), torch.tensor([0, -1, 0, 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    x, groups = torch.randn(64, 4), torch.randint(0, 3, (64,))
    cpu = GroupMixNorm(4, generator=_gen(0))(x, groups)
    gpu = GroupMixNorm(4, generator=_gen(0)).cuda()(x.cuda(), groups.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
