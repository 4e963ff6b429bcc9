"""DMTet refine states as files (mpod_core.pipelines.refine_state_io): a saved and loaded state continues
exactly as the one in memory, copies are independent, foreign files are named, interrupted saves leave nothing."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mpod_core.encoding import HashGridConfig
from mpod_core.fields import NeRFFieldConfig, RadianceField, save_radiance_field
from mpod_core.guidance.oracle import OracleDenoiser
from mpod_core.pipelines import refine_state_io as rio
from mpod_core.pipelines.dmtet_refine import RefineConfig, fit_refine, init_refine_state

TINY = NeRFFieldConfig(hash_grid=HashGridConfig(n_levels=4, log2_hashmap_size=12))
RES = 24


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    stage1 = RadianceField(TINY, samples_per_ray=32, backend="torch",
                           meta={"reference_view": {"elevation": 10.0, "azimuth": 0.0, "distance": 2.2, "fov": 35.0}})
    stage1.field.density = lambda p: 10.0 + 20.0 * (0.45 - p.norm(dim=-1)) / 0.45
    image = torch.rand(RES, RES, 3)
    mask = torch.zeros(RES, RES)
    mask[6:18, 6:18] = 1
    config = RefineConfig(iterations=3, resolution=RES, guidance_resolution=None, grid_cells=8,
                          reference_probability=0.5, learning_rate=0.01, seed=3)
    config.sds.guidance_scale = 1.0
    state = init_refine_state(stage1, config, backend="torch")
    target = torch.rand(3, RES, RES, generator=torch.Generator().manual_seed(1))
    fit_refine(state, stage1, image, mask, OracleDenoiser(target=target), config, backend="torch")
    return stage1, image, mask, config, target, state


def _continue(state, setting):
    stage1, image, mask, config, target, _ = setting
    return fit_refine(state, stage1, image, mask, OracleDenoiser(target=target),
                      RefineConfig(**{**config.__dict__, "iterations": 2}), backend="torch")


def _tensors(state):
    out = {"sdf": state.sdf.detach(), "delta": state.delta.detach()}
    out.update({f"texture.{k}": v.detach() for k, v in state.texture.state_dict().items()})
    for name, m in state.optimizer_state.items():
        out.update({f"adam.{name}.{k}": v for k, v in m.items()})
    return out


def test_round_trip_keeps_every_tensor_and_setting(setting, tmp_path):
    state = setting[-1]
    assert state.steps_done == 3 and {"sdf", "delta"} <= set(state.optimizer_state)
    assert any(k.startswith("texture.") for k in state.optimizer_state)
    path = rio.save_refine_state(state, tmp_path / "s.safetensors")
    loaded = rio.load_refine_state(path, backend="torch")
    a, b = _tensors(state), _tensors(loaded)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].float().reshape(-1), b[k].float().reshape(-1)), k
    assert loaded.steps_done == 3 and loaded.reference_view == state.reference_view
    assert loaded.reference_view["distance"] == 2.2
    assert loaded.grid.resolution == state.grid.resolution and loaded.grid.bbox == pytest.approx(state.grid.bbox)
    assert torch.equal(loaded.grid.tets, state.grid.tets)


def test_a_loaded_state_continues_exactly_like_the_one_in_memory(setting, tmp_path):
    state = setting[-1]
    path = rio.save_refine_state(state, tmp_path / "s.safetensors")
    in_memory = _continue(rio.copy_refine_state(state, backend="torch"), setting)
    from_file = _continue(rio.load_refine_state(path, backend="torch"), setting)
    assert in_memory.state.steps_done == from_file.state.steps_done == 5
    assert torch.equal(in_memory.vertices, from_file.vertices) and torch.equal(in_memory.faces, from_file.faces)
    for name, value in in_memory.state.parameters().items():
        assert torch.equal(value, from_file.state.parameters()[name]), name
    # The control: without the saved Adam moments the continuation differs (they are really used).
    fresh = rio.copy_refine_state(state, backend="torch")
    fresh.optimizer_state = {}
    assert not torch.equal(_continue(fresh, setting).state.sdf, in_memory.state.sdf)


def test_copies_are_independent(setting):
    state = setting[-1]
    before = state.sdf.detach().clone()
    texture_before = {k: v.clone() for k, v in state.texture.state_dict().items()}
    copy = rio.copy_refine_state(state, backend="torch")
    _continue(copy, setting)
    assert torch.equal(state.sdf.detach(), before) and state.steps_done == 3
    assert all(torch.equal(v, texture_before[k]) for k, v in state.texture.state_dict().items())
    assert not torch.equal(copy.sdf.detach(), before)


def test_foreign_files_are_named(setting, tmp_path):
    stage1 = setting[0]
    field_path = save_radiance_field(stage1, tmp_path / "field.safetensors")
    with pytest.raises(ValueError, match="is a radiance field .*Load Radiance Field"):
        rio.load_refine_state(field_path)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an MPOD3D DMTet refine state"):
        rio.read_refine_settings(other)
    path = rio.save_refine_state(setting[-1], tmp_path / "s.safetensors")
    settings = rio.read_refine_settings(path)
    settings["version"] = 99
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "v99.safetensors"), metadata={rio.SETTINGS_KEY: json.dumps(settings)})
    with pytest.raises(ValueError, match="version 99"):
        rio.load_refine_state(tmp_path / "v99.safetensors")
    del tensors["delta"]
    settings["version"] = rio.FORMAT_VERSION
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata={rio.SETTINGS_KEY: json.dumps(settings)})
    with pytest.raises(ValueError, match="do not match a 8-cell grid"):
        rio.load_refine_state(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError):
        rio.load_refine_state(tmp_path / "missing.safetensors")


def test_an_interrupted_save_leaves_no_file(setting, tmp_path, monkeypatch):
    def write_then_interrupt(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(rio, "save_file", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        rio.save_refine_state(setting[-1], tmp_path / "s.safetensors")
    assert list(tmp_path.iterdir()) == []
