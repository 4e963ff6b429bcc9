"""Tests for mpod_core.guidance.diffusers_adapter with tiny random diffusers models
(UNet2DConditionModel 8x8x4 latents, AutoencoderKL 16x16 -> 8x8, DDPMScheduler
with SD's schedule; built here, nothing downloaded).

* encode equals the VAE's scaled posterior mean, is differentiable (float64 gradcheck);
* predict_noise: s = 1 is the conditional UNet output, s = 7.5 equals
  ``eps_u + s (eps_c - eps_u)`` from separate UNet calls;
* v-prediction and x0-prediction schedulers: against the formula on the tiny
  UNet, and a "perfect" model built from diffusers' own ``add_noise`` /
  ``get_velocity`` must give back the exact noise;
* an SDS step moves an image, and the image gradient is the encoder's VJP of the SDS grad.
"""
from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from mpod_core.guidance import (Denoiser, DiffusersDenoiser, SDSConfig,  # noqa: E402
                                scaled_linear_alphas_cumprod, sds_image_loss)

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                   beta_end=0.012)


def _scheduler(prediction_type="epsilon"):
    return diffusers.DDPMScheduler(prediction_type=prediction_type, **SD_SCHEDULE)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, sample_size=16)
    for m in (unet, vae):
        m.eval().requires_grad_(False)
    cond = torch.randn(1, 5, 8)
    uncond = torch.randn(1, 5, 8)
    return unet, vae, cond, uncond


def _denoiser(models, prediction_type="epsilon"):
    unet, vae, cond, uncond = models
    return DiffusersDenoiser(unet, vae, _scheduler(prediction_type), cond, uncond)


def _unet(models, x, t, emb):
    return models[0](x, t, encoder_hidden_states=emb.expand(x.shape[0], -1, -1)).sample


def test_schedule_and_protocol(models):
    den = _denoiser(models)
    assert isinstance(den, Denoiser)
    assert den.alphas_cumprod.shape == (1000,) and den.alphas_cumprod.dtype == torch.float32
    # the oracle's default schedule is diffusers' SD schedule
    torch.testing.assert_close(den.alphas_cumprod, scaled_linear_alphas_cumprod(), rtol=1e-6, atol=1e-7)
    assert den.scaling_factor == pytest.approx(0.18215)


def test_encode_is_the_scaled_posterior_mean_and_differentiable(models):
    den = _denoiser(models)
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    lat = den.encode(img)
    assert lat.shape == (2, 4, 8, 8)
    with torch.no_grad():
        ref = models[1].encode(img * 2 - 1).latent_dist.mean * 0.18215
    torch.testing.assert_close(lat, ref)
    (lat ** 2).sum().backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    # float64 gradcheck of the whole encoder on a tiny image
    vae64 = copy.deepcopy(models[1]).double()
    den64 = DiffusersDenoiser(models[0], vae64, _scheduler(), models[2], models[3])
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(den64.encode, (x,), fast_mode=True)
    # sample mode draws around the mean
    den_s = DiffusersDenoiser(*models[:2], _scheduler(), *models[2:], encode_mode="sample")
    torch.manual_seed(0)
    assert not torch.allclose(den_s.encode(img.detach()), lat.detach())


def _raw_outputs(models, seed: int, timesteps):
    """Noisy latents x, timesteps t and the UNet's raw conditional/unconditional outputs."""
    _, _, cond, uncond = models
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(timesteps)
    with torch.no_grad():
        return x, t, _unet(models, x, t, cond), _unet(models, x, t, uncond)


def test_predict_noise_classifier_free_guidance(models):
    den = _denoiser(models)
    x, t, eps_c, eps_u = _raw_outputs(models, 2, [10, 700])
    with torch.no_grad():
        e1 = den.predict_noise(x, t, 1.0)
        e75 = den.predict_noise(x, t, 7.5)
    assert e1.shape == (2, 4, 8, 8)
    torch.testing.assert_close(e1, eps_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e75, eps_u + 7.5 * (eps_c - eps_u), rtol=1e-4, atol=1e-4)
    assert (e75 - e1).abs().max() > 1e-3        # guidance does something on random weights


def test_v_prediction_is_converted_with_the_formula(models):
    den = _denoiser(models, "v_prediction")
    x, t, v_c, v_u = _raw_outputs(models, 3, [50, 900])
    with torch.no_grad():
        eps = den.predict_noise(x, t, 3.0)
    abar = _scheduler().alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = v_u + 3.0 * (v_c - v_u)
    torch.testing.assert_close(eps, abar.sqrt() * v + (1 - abar).sqrt() * x, rtol=1e-4, atol=1e-4)


class _PerfectUNet:
    """A model that knows x0: returns what a perfect network of the given
    prediction type would, using diffusers' own add_noise/get_velocity conventions."""

    def __init__(self, scheduler, x0, prediction_type):
        self.scheduler, self.x0, self.kind = scheduler, x0, prediction_type

    def __call__(self, sample, timestep, encoder_hidden_states):
        x0 = self.x0.repeat(sample.shape[0] // self.x0.shape[0], 1, 1, 1)
        abar = self.scheduler.alphas_cumprod[timestep].reshape(-1, 1, 1, 1)
        eps = (sample - abar.sqrt() * x0) / (1 - abar).sqrt()
        out = {"epsilon": eps, "v_prediction": self.scheduler.get_velocity(x0, eps, timestep),
               "sample": x0}[self.kind]
        return (out,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_perfect_model_of_each_prediction_type_gives_back_the_noise(prediction_type):
    sched = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    x_t = sched.add_noise(x0, noise, t)
    emb = torch.zeros(1, 2, 8)
    den = DiffusersDenoiser(_PerfectUNet(sched, x0, prediction_type), None, sched, emb, emb)
    for scale in (1.0, 7.5):
        torch.testing.assert_close(den.predict_noise(x_t, t, scale), noise, rtol=1e-5, atol=1e-5)


def test_sds_step_moves_the_image(models):
    den = _denoiser(models)
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    before = img.detach().clone()
    opt = torch.optim.Adam([img], lr=0.01)
    out = sds_image_loss(img, den, SDSConfig(guidance_scale=7.5), generator=torch.Generator().manual_seed(6))
    assert out.grad.shape == (1, 4, 8, 8) and 20 <= int(out.t) <= 980
    out.loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    # d loss / d image = J_encode^T grad (B = 1)
    lat = den.encode(img)
    (vjp,) = torch.autograd.grad(lat, img, out.grad)
    torch.testing.assert_close(img.grad, vjp)
    opt.step()
    assert (img.detach() - before).abs().max() > 1e-3


def test_constructor_checks(models):
    unet, vae, cond, uncond = models
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v_prediction, sample"):
        DiffusersDenoiser(unet, vae, _scheduler("flow_prediction"), cond, uncond)
    with pytest.raises(ValueError, match="no \\(T,\\) alphas_cumprod"):
        DiffusersDenoiser(unet, vae, diffusers.FlowMatchEulerDiscreteScheduler(), cond, uncond)
    with pytest.raises(ValueError, match=r"prompt_embeds: expected \(1 or B, L, D\)"):
        DiffusersDenoiser(unet, vae, _scheduler(), cond[0], uncond)
    with pytest.raises(ValueError, match="must agree in"):
        DiffusersDenoiser(unet, vae, _scheduler(), cond, uncond[:, :3])
    with pytest.raises(ValueError, match="images: expected"):
        _denoiser(models).encode(torch.rand(1, 4, 16, 16))
