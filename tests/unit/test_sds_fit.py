"""SDS Image Fit pipeline with the oracle denoiser (no weights)."""
import pytest
import torch

from mpod_core.guidance import NonFiniteGuidanceError, OracleDenoiser, SDSConfig
from mpod_core.guidance.sds import MAX_CONSECUTIVE_NONFINITE
from mpod_core.pipelines.sds_fit import SDSFitConfig, sds_fit


def _target():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 8, 8, generator=g) * 0.6 + 0.2


def test_fit_moves_the_image_to_the_oracle_target():
    target = _target()
    oracle = OracleDenoiser.from_images(target, sigma=0.05)
    start = torch.full_like(target, 0.5)
    config = SDSFitConfig(steps=150, learning_rate=0.02, seed=1,
                          sds=SDSConfig(guidance_scale=1.0, min_step=0.02, max_step=0.98))
    result = sds_fit(start, oracle, config)
    before = (start - target).pow(2).mean()
    after = (result.image - target).pow(2).mean()
    assert after < before / 1000, f"MSE {before:.4g} -> {after:.4g}"  # measured: ~15000x
    assert len(result.loss_map["loss"]) == 150 and all(g > 0 for g in result.grad_norms)
    assert result.image.min() >= 0 and result.image.max() <= 1


def test_fit_is_seeded():
    target = _target()
    oracle = OracleDenoiser.from_images(target)
    config = SDSFitConfig(steps=5, seed=3)
    a = sds_fit(torch.full_like(target, 0.5), oracle, config).image
    b = sds_fit(torch.full_like(target, 0.5), oracle, config).image
    c = sds_fit(torch.full_like(target, 0.5), oracle, SDSFitConfig(steps=5, seed=4)).image
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_progress_previews_and_interrupt():
    target = _target()
    oracle = OracleDenoiser.from_images(target)
    seen = []
    sds_fit(target.clone(), oracle, SDSFitConfig(steps=7, preview_every=3),
            progress=lambda s, n, p: seen.append((s, n, None if p is None else tuple(p.shape))))
    assert [s for s, _, _ in seen] == list(range(1, 8))
    assert [s for s, _, p in seen if p is not None] == [3, 6, 7]
    assert seen[2][2] == (8, 8, 3)

    class Interrupted(Exception):
        pass

    calls = []

    def stop(step, total, preview):
        calls.append(step)
        raise Interrupted

    with pytest.raises(Interrupted):
        sds_fit(target.clone(), oracle, SDSFitConfig(steps=50), progress=stop)
    assert calls == [1]  # stopped within one step


@pytest.mark.parametrize("image,match", [
    (torch.zeros(1, 4, 8, 8), r"\(B, 3, H, W\)"),
    (torch.zeros(3, 8, 8), r"\(B, 3, H, W\)"),
    (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
])
def test_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        sds_fit(image, OracleDenoiser.from_images(_target()), SDSFitConfig(steps=1))


def test_bad_config():
    with pytest.raises(ValueError, match="steps"):
        SDSFitConfig(steps=0).validate()
    with pytest.raises(ValueError, match="learning_rate"):
        SDSFitConfig(learning_rate=0).validate()


class _NaNDenoiser(OracleDenoiser):
    """The oracle with ``entries`` of its noise prediction (of 192 per 1x3x8x8 call) set to NaN
    on the calls (0-based) in ``calls`` (None: every call)."""

    def __init__(self, target, entries, calls=None):
        super().__init__(target * 2.0 - 1.0, sigma=0.05)  # as OracleDenoiser.from_images
        self.entries, self.calls, self.n = entries, calls, 0

    def predict_noise(self, latents_t, t, guidance_scale, views=None):
        eps = super().predict_noise(latents_t, t, guidance_scale, views)
        if self.calls is None or self.n in self.calls:
            eps.view(-1)[:self.entries] = float("nan")
        self.n += 1
        return eps


@pytest.mark.parametrize("entries,calls,stop_step", [
    (192, None, 0),                              # all entries, every step: a NaN text encoder
    (144, {3}, 3),                               # 75% of one step
    (2, None, MAX_CONSECUTIVE_NONFINITE - 1),    # a few entries, but on every step
])
def test_broken_guidance_stops_the_fit_with_the_step(entries, calls, stop_step):
    target = _target()
    seen = []
    with pytest.raises(NonFiniteGuidanceError, match=f"step {stop_step}\\b") as e:
        sds_fit(torch.full_like(target, 0.5), _NaNDenoiser(target, entries, calls), SDSFitConfig(steps=20),
                progress=lambda s, n, p: seen.append(s))
    assert "MODEL" in str(e.value) and "VAE" in str(e.value)
    assert seen == list(range(1, stop_step + 1))  # stopped at that step, before its update


@pytest.mark.parametrize("calls", [{3}, set(range(0, 20, 2))])
def test_a_few_non_finite_entries_are_tolerated(calls):
    """2 of 192 entries NaN on one step, or on every other step (fp16 overflow at some
    timesteps): the fit runs to the end, the bad entries zeroed, and still converges."""
    target = _target()
    config = SDSFitConfig(steps=60, learning_rate=0.02, seed=1, sds=SDSConfig(guidance_scale=1.0))
    start = torch.full_like(target, 0.5)
    result = sds_fit(start, _NaNDenoiser(target, 2, calls), config)
    assert torch.isfinite(result.image).all()
    assert (result.image - target).pow(2).mean() < (start - target).pow(2).mean() / 10


def test_loss_map_is_the_sds_loss_of_every_step():
    """``{"loss": [...]}`` as core Plot Loss Graph reads it: one finite value per step, each the
    SDS loss of that step (0.5 |grad|^2, reproduced here from the same seeded draws)."""
    from mpod_core.guidance import sds_image_loss
    target = _target()
    oracle = OracleDenoiser.from_images(target)
    config = SDSFitConfig(steps=6, seed=2)
    result = sds_fit(torch.full_like(target, 0.5), oracle, config)
    assert set(result.loss_map) == {"loss"}
    losses = result.loss_map["loss"]
    assert len(losses) == 6 and all(isinstance(v, float) and v == v and abs(v) < float("inf") for v in losses)
    first = sds_image_loss(torch.full_like(target, 0.5), oracle, config.sds, 0, None,
                           torch.Generator().manual_seed(2))
    assert losses[0] == pytest.approx(float(first.loss), rel=1e-6)
    assert len(set(losses)) == 6  # a value per step, not one repeated


def test_images_past_the_encoder_memory_limit_are_refused_naming_it():
    from mpod_core.guidance.sds import MAX_GUIDANCE_PIXELS
    from mpod_core.pipelines.sds_fit import check_image, check_image_size
    assert MAX_GUIDANCE_PIXELS == 512 * 512  # one SD 1.5 image, or four 256^2 views (Zero123 SDS NeRF's batch)
    check_image(torch.zeros(1, 3, 512, 512))
    check_image(torch.zeros(4, 3, 256, 256))
    for b, h, w in ((1, 512, 520), (2, 512, 512), (5, 256, 256), (1, 4096, 4096)):
        with pytest.raises(ValueError, match=f"= {b * h * w} exceeds {MAX_GUIDANCE_PIXELS}"):
            check_image_size(b, h, w)
    calls = []

    class Recording(OracleDenoiser):
        def encode(self, images):
            calls.append(images.shape)
            return super().encode(images)

    oracle = Recording.from_images(_target())
    with pytest.raises(ValueError, match=str(MAX_GUIDANCE_PIXELS)):
        sds_fit(torch.zeros(2, 3, 512, 512), oracle, SDSFitConfig(steps=1))
    assert calls == []  # refused before the encoder ran
