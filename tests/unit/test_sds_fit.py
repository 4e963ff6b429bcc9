"""SDS Image Fit pipeline with the oracle denoiser (no weights)."""
import pytest
import torch

from mpod_core.guidance import OracleDenoiser, SDSConfig
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
    assert len(result.losses) == 150 and all(g > 0 for g in result.grad_norms)
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
