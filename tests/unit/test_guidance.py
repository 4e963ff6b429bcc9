"""Tests for mpod_core.guidance (SDS and the oracle denoiser).

* the SDS gradient on a 1x1x2x2 case against formulas evaluated here in float64
  (guidance scale 1 and 7.5, each weighting, NaN guard, clip, the VSD baseline,
  the 1/B of the loss), with the timestep fixed by a one-timestep range;
* timestep ranges with linear annealing at steps 0, mid, end and beyond, and the
  sampled t staying inside them;
* the oracle's closed form checked by Monte Carlo (it is the MMSE predictor);
* convergence: Adam on a 3x32x32 image with only SDS against the oracle
  (guidance 1, sigma 0.1, t in [0.02, 0.98]): the MSE to the target image falls
  >= 500x in 100 steps (measured 4100-9300x over seeds 0-5, ~0.5 s each); with the gradient negated it
  grows instead; per-view targets (``target_fn``) converge per sample;
* SDSConfig validation and input checks.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mpod_core.configdoc import field_docs
from mpod_core.guidance import (WEIGHTINGS, Denoiser, NonFiniteGuard, NonFiniteGuidanceError, OracleDenoiser,
                                SDSConfig, ViewCondition, scaled_linear_alphas_cumprod, sds_image_loss,
                                sds_loss, timestep_bounds)

F64 = torch.float64

# The tiny case: B = 1, C = 1, 2x2 latents, hand-picked values.
X = [[0.3, -0.5], [1.2, 0.1]]
MU = [[0.5, 0.5], [-0.5, 0.0]]
NOISE = [[0.7, -1.1], [0.2, 0.4]]
SIGMA = 0.1


def _np_abar(T=1000, b0=0.00085, b1=0.012, stored=True):
    """Stable Diffusion's scaled-linear schedule, written out again in numpy float64; with
    ``stored`` rounded to float32 as the protocol stores it (then used in float64)."""
    betas = np.linspace(math.sqrt(b0), math.sqrt(b1), T) ** 2
    abar = np.cumprod(1.0 - betas)
    return abar.astype(np.float32).astype(np.float64) if stored else abar


def _hand_grad(t, scale, weighting, x=X, mu=MU, noise=NOISE, sigma=SIGMA, reference=None):
    """The SDS gradient of the Gaussian oracle, by hand (numpy float64).

    x_t = sqrt(a) x + sqrt(1-a) n; for x0 ~ N(m, s^2): eps*(x_t) = sqrt(1-a)(x_t - sqrt(a) m)/(a s^2 + 1 - a);
    conditional N(mu, sigma^2), unconditional N(0, 1) (whose eps* is sqrt(1-a) x_t);
    guided = eps_u + scale (eps_c - eps_u); grad = w(a) (guided - n).
    """
    a = _np_abar()[t]
    x, mu, n = np.array(x), np.array(mu), np.array(noise)
    xt = math.sqrt(a) * x + math.sqrt(1 - a) * n
    eps_c = math.sqrt(1 - a) * (xt - math.sqrt(a) * mu) / (a * sigma ** 2 + 1 - a)
    eps_u = math.sqrt(1 - a) * xt
    guided = eps_u + scale * (eps_c - eps_u)
    w = {"sds": 1 - a, "uniform": 1.0, "fantasia": math.sqrt(a) * (1 - a)}[weighting]
    ref = n if reference is None else np.array(reference)
    return w * (guided - ref), xt


def _tiny(requires_grad=True):
    x = torch.tensor(X, dtype=F64)[None, None].requires_grad_(requires_grad)
    noise = torch.tensor(NOISE, dtype=F64)[None, None]
    oracle = OracleDenoiser(torch.tensor(MU, dtype=F64)[None], sigma=SIGMA)
    return x, noise, oracle


def _fixed_t(t, T=1000, **kw):
    """A config whose range is the single timestep t."""
    return SDSConfig(min_step=t / T, max_step=t / T, **kw)


def test_oracle_schedule_is_sd_scaled_linear():
    abar = scaled_linear_alphas_cumprod()
    assert abar.shape == (1000,) and abar.dtype == torch.float32
    np.testing.assert_allclose(abar.double().numpy(), _np_abar(stored=False), rtol=1e-6)
    assert abs(float(abar[-1]) - 0.0047) < 1e-4   # SD's abar at t = 999
    assert isinstance(OracleDenoiser(torch.zeros(1, 2, 2)), Denoiser)


@pytest.mark.parametrize("scale", [1.0, 7.5])
@pytest.mark.parametrize("t", [20, 500, 980])
def test_sds_grad_matches_hand_computation_guidance_scale(scale, t):
    x, noise, oracle = _tiny()
    out = sds_loss(x, oracle, _fixed_t(t, guidance_scale=scale), noise=noise)
    expected, _ = _hand_grad(t, scale, "sds")
    assert out.t.tolist() == [t] and out.t.dtype == torch.int64
    np.testing.assert_allclose(out.grad[0, 0].numpy(), expected, rtol=1e-9, atol=1e-12)
    out.loss.backward()
    np.testing.assert_allclose(x.grad[0, 0].numpy(), expected, rtol=1e-9, atol=1e-12)
    assert out.loss.item() == pytest.approx(0.5 * (expected ** 2).sum(), rel=1e-6)
    assert torch.equal(out.noise, noise)


def test_guidance_scale_changes_the_gradient_as_the_formula_says():
    x, noise, oracle = _tiny()
    g1 = sds_loss(x, oracle, _fixed_t(500, guidance_scale=1.0), noise=noise).grad
    g75 = sds_loss(x, oracle, _fixed_t(500, guidance_scale=7.5), noise=noise).grad
    # guided - n is affine in the scale, so grad(7.5) - grad(1) = 6.5 * w * (eps_c - eps_u)
    a = _np_abar()[500]
    _, xt = _hand_grad(500, 1.0, "sds")
    eps_c = math.sqrt(1 - a) * (xt - math.sqrt(a) * np.array(MU)) / (a * SIGMA ** 2 + 1 - a)
    eps_u = math.sqrt(1 - a) * xt
    np.testing.assert_allclose((g75 - g1)[0, 0].numpy(), 6.5 * (1 - a) * (eps_c - eps_u), rtol=1e-6)
    assert (g75 - g1).abs().max() > 0.1


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_each_weighting_matches_hand_computation(weighting):
    x, noise, oracle = _tiny()
    out = sds_loss(x, oracle, _fixed_t(300, guidance_scale=7.5, weighting=weighting), noise=noise)
    expected, _ = _hand_grad(300, 7.5, weighting)
    np.testing.assert_allclose(out.grad[0, 0].numpy(), expected, rtol=1e-9, atol=1e-12)
    out.loss.backward()
    np.testing.assert_allclose(x.grad[0, 0].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_weightings_differ_by_their_factors():
    a = _np_abar()[300]
    grads = {}
    for w in WEIGHTINGS:
        x, noise, oracle = _tiny()
        grads[w] = sds_loss(x, oracle, _fixed_t(300, weighting=w), noise=noise).grad
    torch.testing.assert_close(grads["sds"], (1 - a) * grads["uniform"])
    torch.testing.assert_close(grads["fantasia"], math.sqrt(a) * (1 - a) * grads["uniform"])


def test_generator_draws_t_then_noise():
    x, _, oracle = _tiny()
    cfg = SDSConfig(guidance_scale=1.0)
    out = sds_loss(x, oracle, cfg, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(20, 981, (1,), generator=g)
    noise = torch.randn((1, 1, 2, 2), generator=g, dtype=F64)
    assert torch.equal(out.t, t) and torch.equal(out.noise, noise)
    expected, _ = _hand_grad(int(t), 1.0, "sds", noise=noise[0, 0].numpy())
    np.testing.assert_allclose(out.grad[0, 0].numpy(), expected, rtol=1e-9, atol=1e-12)
    again = sds_loss(x, oracle, cfg, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again.grad, out.grad)


def test_loss_gradient_is_grad_over_batch_and_prediction_is_detached():
    calls = []

    class Recorder(OracleDenoiser):
        def predict_noise(self, latents_t, t, guidance_scale, views=None):
            calls.append((torch.is_grad_enabled(), latents_t.requires_grad))
            return super().predict_noise(latents_t, t, guidance_scale, views)

    x = torch.tensor([X, MU], dtype=F64)[:, None].requires_grad_(True)
    oracle = Recorder(torch.tensor(MU, dtype=F64)[None], sigma=SIGMA)
    out = sds_loss(x, oracle, SDSConfig(guidance_scale=7.5), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    torch.testing.assert_close(x.grad, out.grad / 2)
    assert out.loss.item() == pytest.approx(0.5 * (out.grad ** 2).sum().item() / 2)
    assert calls == [(False, False)]


def test_image_loss_backpropagates_through_encode():
    img = torch.tensor(X, dtype=F64)[None, None].requires_grad_(True)
    _, noise, oracle = _tiny()
    out = sds_image_loss(img, oracle, _fixed_t(400, guidance_scale=3.0), noise=noise)
    out.loss.backward()
    expected, _ = _hand_grad(400, 3.0, "sds", x=(2 * np.array(X) - 1))
    np.testing.assert_allclose(out.grad[0, 0].numpy(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(img.grad[0, 0].numpy(), 2 * expected, rtol=1e-9, atol=1e-12)  # d(2x-1)/dx


# ---------------------------------------------------------------- timestep ranges


@pytest.mark.parametrize("step,expected", [(0, (400, 850)), (50, (350, 762)), (100, (300, 675)),
                                           (200, (200, 500)), (1000, (200, 500))])
def test_timestep_bounds_anneal_linearly(step, expected):
    # Zero123's schedule: [0.4, 0.85] -> [0.2, 0.5] over 200 steps; T = 1000.
    # step 50: 0.4 - 0.2/4 = 0.35, 0.85 - 0.35/4 = 0.7625 -> round(762.5) = 762 (banker's rounding)
    cfg = SDSConfig(min_step=0.4, max_step=0.85, anneal_min_step=0.2, anneal_max_step=0.5, anneal_steps=200)
    assert timestep_bounds(cfg, step, 1000) == expected


def test_timestep_bounds_plain_and_edges():
    assert timestep_bounds(SDSConfig(), 0, 1000) == (20, 980)
    assert timestep_bounds(SDSConfig(), 10 ** 6, 1000) == (20, 980)            # no annealing
    assert timestep_bounds(SDSConfig(min_step=0.0, max_step=1.0), 0, 1000) == (0, 999)
    assert timestep_bounds(SDSConfig(min_step=0.5, max_step=0.5), 0, 1000) == (500, 500)
    assert timestep_bounds(SDSConfig(min_step=0.2, max_step=0.6), 0, 50) == (10, 30)
    # only one end annealed; anneal_steps = 0 means the end range from the start
    cfg = SDSConfig(min_step=0.02, max_step=0.98, anneal_max_step=0.5, anneal_steps=10)
    assert timestep_bounds(cfg, 5, 1000) == (20, 740)
    cfg = SDSConfig(min_step=0.02, max_step=0.98, anneal_min_step=0.3, anneal_steps=0)
    assert timestep_bounds(cfg, 0, 1000) == (300, 980)
    with pytest.raises(ValueError, match="step must be >= 0"):
        timestep_bounds(SDSConfig(), -1, 1000)


def test_sampled_timesteps_stay_in_the_annealed_range_and_cover_it():
    cfg = SDSConfig(guidance_scale=1.0, min_step=0.4, max_step=0.85, anneal_min_step=0.2,
                    anneal_max_step=0.5, anneal_steps=200)
    x = torch.zeros(4096, 1, 2, 2, dtype=F64, requires_grad=True)
    oracle = OracleDenoiser(torch.zeros(1, 2, 2, dtype=F64))
    g = torch.Generator().manual_seed(3)
    for step, (lo, hi) in ((0, (400, 850)), (100, (300, 675)), (300, (200, 500))):
        t = sds_loss(x, oracle, cfg, step=step, generator=g).t
        assert int(t.min()) == lo and int(t.max()) == hi
    # uniform over a 3-timestep range
    t = sds_loss(x, oracle, SDSConfig(min_step=0.1, max_step=0.102), generator=g).t
    counts = torch.bincount(t - 100, minlength=3)
    assert len(counts) == 3 and (counts - 4096 / 3).abs().max() < 150   # ~5 standard deviations


# ---------------------------------------------------------------- guards and hooks


class _BadDenoiser:
    """Returns NaN, +inf and -inf in three of the four latent pixels."""

    alphas_cumprod = scaled_linear_alphas_cumprod()

    def encode(self, images):
        return images

    def predict_noise(self, latents_t, t, guidance_scale, views=None):
        out = torch.full_like(latents_t, 0.25)
        out[..., 0, 0], out[..., 0, 1], out[..., 1, 0] = float("nan"), float("inf"), -float("inf")
        return out


def test_nan_guard_zeroes_non_finite_gradient_entries():
    x, noise, _ = _tiny()
    out = sds_loss(x, _BadDenoiser(), _fixed_t(500, guidance_scale=7.5), noise=noise)
    a = _np_abar()[500]
    expected = np.array([[0.0, 0.0], [0.0, (1 - a) * (0.25 - NOISE[1][1])]])
    np.testing.assert_allclose(out.grad[0, 0].numpy(), expected, rtol=1e-6, atol=1e-12)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(x.grad).all()
    np.testing.assert_allclose(x.grad[0, 0].numpy(), expected, rtol=1e-6, atol=1e-12)


def test_guard_raises_on_a_mostly_non_finite_step_naming_the_causes_and_the_step():
    """3 of 4 entries bad (75% > 50%): the guarded call raises before returning; unguarded it is zeroed."""
    x, noise, _ = _tiny()
    guard = NonFiniteGuard()
    with pytest.raises(NonFiniteGuidanceError, match=r"at step 7: 75% .*3 of 4 entries.*\(timesteps \[500\]\)") as e:
        sds_loss(x, _BadDenoiser(), _fixed_t(500), step=7, noise=noise, guard=guard)
    for cause in ("MODEL", "text encoder", "CLIP vision", "VAE"):
        assert cause in str(e.value)
    assert isinstance(e.value, FloatingPointError)  # callers that catch diverging losses see it too
    assert sds_loss(x, _BadDenoiser(), _fixed_t(500), noise=noise).nonfinite == 3


def test_guard_counts_steps_in_a_row_and_forgets_after_a_clean_step():
    guard = NonFiniteGuard(max_consecutive=3)
    t = torch.tensor([10])
    for step in range(2):
        guard.update(1, 100, step, t)  # 1% bad: tolerated
    guard.update(0, 100, 2, t)          # a clean step resets the count
    guard.update(1, 100, 3, t)
    guard.update(2, 100, 4, t)
    with pytest.raises(NonFiniteGuidanceError, match=r"at step 5: .* 3 steps in a row \(steps 3-5, up to 2.0% of the entries\)"):
        guard.update(1, 100, 5, t)
    guard = NonFiniteGuard()
    guard.update(50, 100, 0, t)  # exactly half: not "most"
    with pytest.raises(NonFiniteGuidanceError, match="51%"):
        NonFiniteGuard().update(51, 100, 0, t)


def test_guard_names_the_vae_when_the_latents_are_not_finite():
    class NaNEncoder(_BadDenoiser):
        def encode(self, images):
            return images * float("nan")

    with pytest.raises(NonFiniteGuidanceError, match="latents .* VAE") as e:
        sds_image_loss(torch.rand(1, 1, 2, 2), NaNEncoder(), _fixed_t(500), guard=NonFiniteGuard())
    assert "noise predictions" not in str(e.value)
    with pytest.raises(NonFiniteGuidanceError, match="images given to the guidance .* diverged"):
        sds_image_loss(torch.full((1, 1, 2, 2), float("nan")), _BadDenoiser(), _fixed_t(500), step=3,
                       guard=NonFiniteGuard())


def test_grad_clip_clamps_elementwise():
    x, noise, oracle = _tiny()
    expected, _ = _hand_grad(700, 7.5, "sds")
    clip = 0.5 * np.abs(expected).max()
    assert (np.abs(expected) > clip).any() and (np.abs(expected) < clip).any()
    out = sds_loss(x, oracle, _fixed_t(700, guidance_scale=7.5, grad_clip=clip), noise=noise)
    np.testing.assert_allclose(out.grad[0, 0].numpy(), np.clip(expected, -clip, clip), rtol=1e-6)
    out.loss.backward()
    np.testing.assert_allclose(x.grad[0, 0].numpy(), np.clip(expected, -clip, clip), rtol=1e-6)


def test_baseline_hook_replaces_the_sampled_noise():
    x, noise, oracle = _tiny()
    ref = [[0.1, 0.2], [-0.3, 0.4]]
    seen = {}
    views = ViewCondition(torch.tensor([10.0]), torch.tensor([30.0]), torch.tensor([2.5]))

    def baseline(latents_t, t, v):
        seen.update(latents_t=latents_t.clone(), t=t.clone(), views=v, grad=torch.is_grad_enabled())
        return torch.tensor(ref, dtype=F64)[None, None]

    out = sds_loss(x, oracle, _fixed_t(600, guidance_scale=7.5), views=views, noise=noise, baseline=baseline)
    expected, xt = _hand_grad(600, 7.5, "sds", reference=ref)
    np.testing.assert_allclose(out.grad[0, 0].numpy(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(seen["latents_t"][0, 0].numpy(), xt, rtol=1e-9)
    assert seen["t"].tolist() == [600] and seen["views"] is views and seen["grad"] is False
    out.loss.backward()
    np.testing.assert_allclose(x.grad[0, 0].numpy(), expected, rtol=1e-9, atol=1e-12)
    # a baseline that returns the noise itself is plain SDS
    plain = sds_loss(x, oracle, _fixed_t(600, guidance_scale=7.5), noise=noise,
                     baseline=lambda lt, t, v: noise.clone())
    np.testing.assert_allclose(plain.grad[0, 0].numpy(), _hand_grad(600, 7.5, "sds")[0], rtol=1e-6)


# ---------------------------------------------------------------- the oracle


def test_oracle_prediction_is_the_posterior_mean_by_monte_carlo():
    # For x0 ~ N(mu, s^2), eps ~ N(0, 1): E[eps | x_t] is linear in x_t, so it is the MMSE
    # predictor iff the residual is uncorrelated with 1 and x_t; a wrong formula is not.
    g = torch.Generator().manual_seed(0)
    n, mu, s, t = 400_000, 0.7, 0.3, 400
    oracle = OracleDenoiser(torch.full((1, 1, 1), mu, dtype=F64), sigma=s)
    a = float(oracle.alphas_cumprod[t])
    x0 = mu + s * torch.randn(n, 1, 1, 1, generator=g, dtype=F64)
    eps = torch.randn(n, 1, 1, 1, generator=g, dtype=F64)
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    pred = oracle.predict_noise(xt, torch.full((n,), t), 1.0)
    res = eps - pred
    assert abs(res.mean()) < 5e-3 and abs((res * xt).mean()) < 5e-3
    assert ((eps - pred) ** 2).mean() < ((eps - 1.05 * pred) ** 2).mean()
    # the unconditional N(0, 1) branch and the guidance combination
    pu = OracleDenoiser(torch.full((1, 1, 1), mu, dtype=F64), sigma=s, uncond_mean=0.0, uncond_sigma=1.0)
    eps_u = math.sqrt(1 - a) * xt[:5]
    guided = pu.predict_noise(xt[:5], torch.full((5,), t), 4.0)
    torch.testing.assert_close(guided, eps_u + 4.0 * (pred[:5] - eps_u))


def test_oracle_encode_decode_and_target_fn():
    img = torch.rand(2, 3, 4, 4, dtype=F64, requires_grad=True)
    oracle = OracleDenoiser.from_images(img.detach()[0], sigma=0.1)
    lat = oracle.encode(img)
    torch.testing.assert_close(lat, img * 2 - 1)
    torch.testing.assert_close(oracle.decode(lat), img)
    lat.sum().backward()
    assert torch.equal(img.grad, torch.full_like(img, 2.0))
    with pytest.raises(ValueError, match="exactly one of target and target_fn"):
        OracleDenoiser()
    with pytest.raises(ValueError, match="target: expected"):
        OracleDenoiser(torch.zeros(4, 4))
    bad = OracleDenoiser(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="oracle target"):
        bad.predict_noise(torch.zeros(1, 4, 4, 4), torch.tensor([3]), 1.0)


# ---------------------------------------------------------------- convergence


def _optimise(sign: float, steps: int = 100, sigma: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(1, 3, 32, 32, generator=g) * 0.8 + 0.1
    oracle = OracleDenoiser.from_images(target, sigma=sigma)
    img = torch.rand(1, 3, 32, 32, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([img], lr=0.02)
    cfg = SDSConfig(guidance_scale=1.0)            # t in [0.02, 0.98], w = 1 - abar
    err0 = ((img - target) ** 2).mean().item()
    for step in range(steps):
        out = sds_image_loss(img, oracle, cfg, step=step, generator=g)
        opt.zero_grad()
        (sign * out.loss).backward()
        opt.step()
    return err0, ((img.detach() - target) ** 2).mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_sds_against_oracle_converges_to_the_target(seed):
    err0, err = _optimise(+1.0, seed=seed)
    assert err0 / err >= 500, f"MSE fell only {err0 / err:.1f}x in 100 steps ({err0:.4f} -> {err:.2e})"


def test_sds_with_the_gradient_negated_does_not_converge():
    err0, err = _optimise(-1.0)
    assert err > 5 * err0, f"negated SDS should move away: {err0:.4f} -> {err:.4f}"


def test_per_view_targets_converge_per_sample():
    g = torch.Generator().manual_seed(5)
    targets = {0.0: torch.rand(3, 8, 8, generator=g) * 2 - 1, 90.0: torch.rand(3, 8, 8, generator=g) * 2 - 1}

    def target_fn(views, batch):
        assert views is not None and len(views) == batch
        return torch.stack([targets[float(a)] for a in views.azimuth])

    oracle = OracleDenoiser(target_fn=target_fn, sigma=0.1)
    views = ViewCondition(torch.zeros(2), torch.tensor([90.0, 0.0]), torch.full((2,), 2.5))
    lat = torch.zeros(2, 3, 8, 8, requires_grad=True)
    opt = torch.optim.Adam([lat], lr=0.03)
    for step in range(150):
        out = sds_loss(lat, oracle, SDSConfig(guidance_scale=1.0), step, views=views, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    want = torch.stack([targets[90.0], targets[0.0]])
    err = ((lat.detach() - want) ** 2).mean(dim=(1, 2, 3))
    swapped = ((lat.detach() - want.flip(0)) ** 2).mean(dim=(1, 2, 3))
    assert (err < 1e-3).all() and (swapped > 0.3).all(), (err, swapped)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,match", [
    (dict(guidance_scale=0.0), "guidance_scale must be a finite number > 0"),
    (dict(guidance_scale=-3.0), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale="7.5"), "guidance_scale"),
    (dict(min_step=None), "min_step must be a fraction"),
    (dict(min_step=-0.1), "min_step must be a fraction"),
    (dict(max_step=1.5), "max_step must be a fraction"),
    (dict(min_step=0.6, max_step=0.5), r"min_step \(0.6\) must be <= max_step \(0.5\)"),
    (dict(anneal_min_step=1.2), "anneal_min_step must be a fraction"),
    (dict(anneal_min_step=0.6, anneal_max_step=0.4, anneal_steps=10),
     "anneal_min_step .* <= anneal_max_step"),
    (dict(min_step=0.5, max_step=0.9, anneal_max_step=0.3, anneal_steps=10),
     r"min_step \(0.5\) must be <= anneal_max_step"),
    (dict(anneal_steps=-1), "anneal_steps must be an integer >= 0"),
    (dict(anneal_steps=2.5), "anneal_steps"),
    (dict(weighting="sigmoid"), "weighting must be one of sds, uniform, fantasia"),
    (dict(grad_clip=0.0), "grad_clip must be None or a finite number > 0"),
    (dict(grad_clip=-1.0), "grad_clip"),
])
def test_config_validation(kwargs, match):
    cfg = SDSConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        cfg.validate()
    x, noise, oracle = _tiny()
    with pytest.raises(ValueError, match=match):
        sds_loss(x, oracle, cfg, noise=noise)


# What the rest of the pack relies on: the fields the SDS Image Fit node and TimestepSchedule.sds_config
# pass by name, with threestudio's SD-guidance defaults (guidance.guidance_scale 100, min_step_percent
# 0.02, max_step_percent 0.98, weighting "sds"; no anneal, no clip). New fields may be added freely.
REQUIRED_SDS_DEFAULTS = {
    "guidance_scale": 100.0, "min_step": 0.02, "max_step": 0.98,
    "anneal_min_step": None, "anneal_max_step": None, "anneal_steps": 0, "anneal_start_step": 0,
    "weighting": "sds", "grad_clip": None,
}


def test_default_config_is_valid_and_documented():
    SDSConfig().validate()
    SDSConfig(min_step=0.4, max_step=0.85, anneal_min_step=0.2, anneal_max_step=0.5,
              anneal_steps=200).validate()
    default = SDSConfig()
    fields = {f.name: f for f in dataclasses.fields(SDSConfig)}
    missing = sorted(set(REQUIRED_SDS_DEFAULTS) - set(fields))
    assert not missing, f"SDSConfig lost fields the nodes and schedules set: {missing}"
    for name, value in REQUIRED_SDS_DEFAULTS.items():
        assert getattr(default, name) == value, (name, getattr(default, name), value)
    # Every field, old or new, has a default (SDSConfig() above) and a docstring: field_docs is
    # where node tooltips come from, so an undocumented field would show an empty tooltip.
    docs = field_docs(SDSConfig)
    undocumented = sorted(name for name in fields if not docs.get(name, "").strip())
    assert not undocumented, f"SDSConfig fields without a docstring: {undocumented}"


def test_input_checks():
    x, noise, oracle = _tiny()
    cfg = SDSConfig(guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"latents: expected \(B, C, h, w\), got \(2, 2\)"):
        sds_loss(x[0, 0], oracle, cfg)
    with pytest.raises(ValueError, match=r"noise: expected \(1, 1, 2, 2\)"):
        sds_loss(x, oracle, cfg, noise=noise[0])
    with pytest.raises(ValueError, match=r"t: timesteps must be in \[0, 1000\)"):
        sds_loss(x, oracle, cfg, t=torch.tensor([1000]))
    with pytest.raises(ValueError, match="t: expected"):
        sds_loss(x, oracle, cfg, t=torch.tensor([1, 2]))
    views = ViewCondition(torch.zeros(2), torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="views: expected 1 cameras"):
        sds_loss(x, oracle, cfg, views=views)
    with pytest.raises(ValueError, match="images: expected"):
        sds_image_loss(x[0], oracle, cfg)
    # an explicit t outside the configured range is allowed (tests, schedules)
    out = sds_loss(x, oracle, cfg, t=torch.tensor([5]), noise=noise)
    np.testing.assert_allclose(out.grad[0, 0].numpy(), _hand_grad(5, 1.0, "sds")[0],
                               rtol=1e-9, atol=1e-12)
