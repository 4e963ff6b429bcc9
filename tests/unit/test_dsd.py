"""Dual score distillation (mpod_core.guidance.dsd) and the VSD score (mpod_core.guidance.vsd).

* timesteps: over 10^4 draws each term's t lies in its range and covers it (concept [0.50, 0.75],
  reference [0.10, 0.25] of T);
* the total gradient on the colour and normal latents equals 0.2 g_concept(colour) + 1.0 (g_ref(colour)
  + g_ref(normal)), each g recomputed alone from the term's own t and noise (oracle priors);
* the concept prior only ever sees the colour render; the reference prior sees both;
* a baseline equal to the prior gives a zero gradient; a fresh VSD score (eps and v models) *is* the prior's
  conditional prediction, so VSD at CFG 1 gives zero; trained on one render, the score learns its noise.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mpod_core.configdoc import field_docs
from mpod_core.guidance import OracleDenoiser, sds_loss
from mpod_core.guidance.dsd import DSDConfig, DSDTerm, dsd_loss, themestation_terms

T = 1000


class _Recording:
    """A denoiser that remembers every noisy latent it is asked about."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.alphas_cumprod = inner.alphas_cumprod

    def encode(self, images):
        return self.inner.encode(images)

    def predict_noise(self, latents_t, t, guidance_scale, views=None):
        self.seen.append((latents_t.clone(), t.clone()))
        return self.inner.predict_noise(latents_t, t, guidance_scale, views)


def _oracles(shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(3)
    return [OracleDenoiser(torch.randn(*shape, generator=g) * 0.5, sigma=0.1) for _ in range(3)]


def test_each_term_draws_its_timesteps_in_its_own_range():
    concept, ref, ref_n = (_Recording(o) for o in _oracles((4, 1, 1)))
    terms = themestation_terms(DSDConfig(), concept, ref, ref_n)
    n = 10_000
    lat = {k: torch.randn(n, 4, 1, 1) for k in ("color", "normal")}
    out = dsd_loss(lat, terms, generator=torch.Generator().manual_seed(0))
    bounds = {"concept_color": (500, 750), "reference_color": (100, 250), "reference_normal": (100, 250)}
    for name, (lo, hi) in bounds.items():
        t = out.terms[name].t
        assert t.numel() == n
        assert int(t.min()) >= lo and int(t.max()) <= hi, name
        assert int(t.min()) <= lo + 2 and int(t.max()) >= hi - 2, name  # the whole range is used
    # independent draws: the two reference terms do not share t
    assert not torch.equal(out.terms["reference_color"].t, out.terms["reference_normal"].t)


def test_total_gradient_is_the_weighted_sum_of_the_terms():
    oc, orf, orn = _oracles()
    terms = themestation_terms(DSDConfig(), oc, orf, orn)
    color = torch.randn(2, 4, 8, 8, requires_grad=True)
    normal = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = dsd_loss({"color": color, "normal": normal}, terms, generator=torch.Generator().manual_seed(1))
    out.loss.backward()

    def alone(term_name, denoiser, latents, lo, hi):
        o = out.terms[term_name]
        cfg = DSDTerm("x", "color", denoiser, lo, hi, 1.0, 7.5).sds_config()
        x = latents.detach().clone().requires_grad_(True)
        sds_loss(x, denoiser, cfg, t=o.t, noise=o.noise).loss.backward()
        return x.grad

    g_c = alone("concept_color", oc, color, 0.5, 0.75)
    g_rc = alone("reference_color", orf, color, 0.1, 0.25)
    g_rn = alone("reference_normal", orn, normal, 0.1, 0.25)
    torch.testing.assert_close(color.grad, 0.2 * g_c + 1.0 * g_rc, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(normal.grad, g_rn, rtol=1e-5, atol=1e-7)
    # the weights matter: the unweighted sum is measurably different
    assert (color.grad - (g_c + g_rc)).abs().max() > 0.1 * g_c.abs().max()


def test_the_concept_prior_never_receives_the_normal_render():
    concept, ref, ref_n = (_Recording(o) for o in _oracles())
    terms = themestation_terms(DSDConfig(), concept, ref, ref_n)
    color, normal = torch.rand(1, 4, 8, 8), torch.rand(1, 4, 8, 8) + 5.0  # far apart
    for seed in range(5):
        out = dsd_loss({"color": color, "normal": normal}, terms, generator=torch.Generator().manual_seed(seed))
        for rec, name, src in ((concept, "concept_color", color), (ref, "reference_color", color),
                               (ref_n, "reference_normal", normal)):
            o = out.terms[name]
            abar = rec.alphas_cumprod[o.t].reshape(-1, 1, 1, 1)
            torch.testing.assert_close(rec.seen[-1][0], abar.sqrt() * src + (1 - abar).sqrt() * o.noise)
    assert len(concept.seen) == 5 and all(x.mean() < 3 for x, _ in concept.seen)
    assert [t.kind for t in terms if t.prior == "concept"] == ["color"]
    assert sorted(t.kind for t in terms if t.prior == "reference") == ["color", "normal"]


def test_a_baseline_equal_to_the_prior_gives_zero_gradient():
    oc, orf, orn = _oracles()
    same = {name: (lambda d: (lambda x, t, v=None: d.predict_noise(x, t, 1.0, v)))(d)
            for name, d in (("concept_color", oc), ("reference_color", orf), ("reference_normal", orn))}
    terms = themestation_terms(dataclasses.replace(DSDConfig(), guidance_scale=1.0), oc, orf, orn, same)
    lat = {k: torch.randn(2, 4, 8, 8) for k in ("color", "normal")}
    out = dsd_loss(lat, terms, generator=torch.Generator().manual_seed(0))
    for o in out.terms.values():
        assert o.grad.abs().max() == 0
    # control: the same without baselines (SDS) has a gradient
    out = dsd_loss(lat, themestation_terms(DSDConfig(), oc, orf, orn), generator=torch.Generator().manual_seed(0))
    assert all(o.grad.abs().max() > 1e-3 for o in out.terms.values())


def test_bad_terms_and_settings_are_named():
    oc, orf, orn = _oracles()
    terms = themestation_terms(DSDConfig(), oc, orf, orn)
    with pytest.raises(ValueError, match="reads the normal render"):
        dsd_loss({"color": torch.randn(1, 4, 8, 8)}, terms)
    with pytest.raises(ValueError, match="unknown DSD terms: concept_normal"):
        themestation_terms(DSDConfig(), oc, orf, orn, {"concept_normal": lambda *a: None})
    with pytest.raises(ValueError, match="concept_min_step"):
        DSDConfig(concept_min_step=0.8).validate()
    with pytest.raises(ValueError, match="reference_weight"):
        DSDConfig(reference_weight=-1.0).validate()
    with pytest.raises(ValueError, match="score"):
        DSDConfig(score="sjc").validate()
    with pytest.raises(ValueError, match="kind"):
        DSDTerm("p", "depth", oc, 0.1, 0.2, 1.0).validate()


def test_defaults_name_their_source():
    docs = field_docs(DSDConfig)
    d = DSDConfig()
    assert (d.concept_min_step, d.concept_max_step, d.reference_min_step, d.reference_max_step) == (0.5, 0.75, 0.1, 0.25)
    assert (d.concept_weight, d.reference_weight, d.guidance_scale, d.score) == (0.2, 1.0, 7.5, "vsd")
    for name in ("concept_min_step", "reference_max_step", "concept_weight", "reference_weight", "guidance_scale"):
        assert "theme-station-optimization.yaml" in docs[name] or "paper" in docs[name], name


# ---------------------------------------------------------------- VSD score on tiny diffusers models
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from harness.tiny_sd import ddpm_scheduler, tiny_models, vocabulary, word_tokenizer  # noqa: E402
from mpod_core.guidance import DiffusersDenoiser  # noqa: E402
from mpod_core.guidance.theme_finetune_diffusers import DiffusersFinetuneModel  # noqa: E402
from mpod_core.guidance.vsd import VSDConfig, VSDScore  # noqa: E402

VOCAB = vocabulary("a 3d model of chair in the style sks normal map".split())


@pytest.fixture(scope="module")
def tiny():
    return tiny_models(len(VOCAB))


def _pair(tiny, prediction_type):
    unet, vae, text = tiny
    model = DiffusersFinetuneModel(unet, vae, text, ddpm_scheduler(prediction_type), word_tokenizer(VOCAB),
                                   bos=0, eos=1, pad=2)
    ctx = model.encode_text(["a 3d model of chair in the style of sks"]).detach()
    prior = DiffusersDenoiser(unet, vae, ddpm_scheduler(prediction_type), ctx, torch.zeros_like(ctx))
    return model, ctx, prior


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_fresh_vsd_score_is_the_prior_so_vsd_at_cfg_1_is_zero(tiny, prediction_type, torch_one_thread):
    model, ctx, prior = _pair(tiny, prediction_type)
    with VSDScore(model, {"color": ctx}, VSDConfig(seed=1)) as score:
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        cfg = DSDTerm("p", "color", prior, 0.1, 0.9, 1.0, guidance_scale=1.0).sds_config()
        g = torch.Generator().manual_seed(2)
        out = sds_loss(x, prior, cfg, generator=g, baseline=score.baseline("color"))
        assert out.grad.abs().max() < 1e-5
        # control: with CFG 7.5 the baseline removes the conditional part only, a gradient remains
        out = sds_loss(x, prior, dataclasses.replace(cfg, guidance_scale=7.5), generator=g,
                       baseline=score.baseline("color"))
        assert out.grad.abs().max() > 1e-3
    assert all(layer.handle is None for layer in score.lora.layers.values())  # hooks removed


def test_vsd_score_training_fits_the_render(tiny, torch_one_thread):
    """At one fixed draw (the generator reseeded each step) the LoRA's diffusion loss on the render falls, and
    the baseline moves with it: the score model trains on what it is given. (Random draws on the tiny UNet
    learn too slowly to measure in a unit test: its attention layers are a small part of it.)"""
    model, ctx, _ = _pair(tiny, "epsilon")
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    x_t, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with VSDScore(model, {"color": ctx}, VSDConfig(learning_rate=3e-2, weight_decay=0.0)) as score:
        start = score.predict_eps(x_t, t, "color")
        losses = [score.train_step({"color": x0}, torch.Generator().manual_seed(0)) for _ in range(40)]
        moved = score.predict_eps(x_t, t, "color")
    assert losses[-1] < 0.6 * losses[0], losses
    assert (moved - start).abs().max() > 1e-3
    assert score.steps == 40


def test_vsd_score_input_errors(tiny):
    model, ctx, _ = _pair(tiny, "epsilon")
    with pytest.raises(ValueError, match=r"expected \(1, L, D\)"):
        VSDScore(model, {"color": ctx[0]})
    with pytest.raises(ValueError, match="lora_rank"):
        VSDScore(model, {"color": ctx}, VSDConfig(rank=0))
    with VSDScore(model, {"color": ctx}) as score:
        with pytest.raises(ValueError, match="no prompt for the normal render"):
            score.baseline("normal")
    assert "threestudio" in field_docs(VSDConfig)["rank"]


def test_prompts_carry_the_theme_token():
    from mpod_core.guidance.dsd import dsd_prompts
    p = dsd_prompts("chair", "sks")
    assert p == {"concept_color": "a 3d model of sks chair",
                 "reference_color": "a 3d model of chair, in the style of sks",
                 "reference_normal": "a 3d model of chair, in the style of sks, normal map"}
    with pytest.raises(ValueError, match="reference_prompt .* lacks the theme token 'sks'"):
        dsd_prompts("chair", "sks", reference="a 3d model of {object}")
    with pytest.raises(ValueError, match="concept_prompt"):
        dsd_prompts("chair", "sks", concept="a {colour} {object} {token}")
    with pytest.raises(ValueError, match="must not be empty"):
        dsd_prompts("chair", " ")
    assert dsd_prompts("chair", "zwx", concept="{token}, {object}")["concept_color"] == "zwx, chair"
