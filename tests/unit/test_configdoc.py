"""Config fields as widgets: :func:`mpod_core.configdoc.field_spec` reads each field's type,
default, declared range and docstring, so a node declares its config once."""
from dataclasses import dataclass, field
from typing import Optional

import pytest

from mpod_core.configdoc import config_from_values, field_spec, limits
from mpod_core.layout.align import LOSSES, LayoutConfig
from mpod_core.layout.ot_loss import OTLossConfig
from mpod_core.pipelines.mpod123 import MAX_RESOLUTION, Stage1Config
from mpod_core.pipelines.reparo import ReferenceView
from nodes.registry import NODE_CATEGORIES, NODE_DISPLAY_NAMES


@dataclass
class Toy:
    steps: int = field(default=7, metadata=limits(1, 99))
    """How many (toy: 7)."""
    rate: Optional[float] = field(default=0.5, metadata=limits(0.0, 1.0, 0.05))
    """A rate."""
    mode: str = field(default="b", metadata=limits(options=("a", "b")))
    on: bool = True
    pair: tuple = (1, 2)


def test_field_spec_reads_type_default_range_and_docstring():
    s = field_spec(Toy, "steps")
    assert (s.kind, s.default, s.min, s.max, s.step, s.doc) == (int, 7, 1, 99, None, "How many (toy: 7).")
    r = field_spec(Toy, "rate")  # Optional[float] is a float widget
    assert (r.kind, r.default, r.min, r.max, r.step) == (float, 0.5, 0.0, 1.0, 0.05)
    m = field_spec(Toy, "mode")
    assert (m.kind, m.options, m.doc) == (str, ("a", "b"), "")
    assert field_spec(Toy, "on").kind is bool and field_spec(Toy, "on").min is None


def test_field_spec_refuses_unknown_and_unwidgetable_fields():
    with pytest.raises(KeyError, match="no field 'nope'"):
        field_spec(Toy, "nope")
    with pytest.raises(TypeError, match="pair"):
        field_spec(Toy, "pair")


def test_config_from_values_takes_the_fields_it_has_and_keeps_defaults():
    values = {"iterations": 12, "alpha": 3.0, "pixel_weight": 0.0, "backend": "auto", "resolution": 64}
    cfg = config_from_values(LayoutConfig, values, ot=config_from_values(OTLossConfig, values))
    assert cfg.iterations == 12 and cfg.pixel_weight == 0.0 and cfg.ot.alpha == 3.0
    assert cfg.learning_rate == LayoutConfig().learning_rate and cfg.ot.beta == OTLossConfig().beta
    assert config_from_values(ReferenceView, values).resolution == 64


@pytest.mark.parametrize("cls, name, default, lo, hi", [
    (LayoutConfig, "iterations", 500, 1, 10000), (LayoutConfig, "learning_rate", 0.02, 1e-4, 1.0),
    (OTLossConfig, "alpha", 1.0, 0.0, 100.0), (OTLossConfig, "match_interval", 5, 1, 100),
    (ReferenceView, "resolution", 256, 32, 1024), (Stage1Config, "resolution", 128, 16, MAX_RESOLUTION),
    (Stage1Config, "iterations", 5000, 1, 100000)])
def test_widget_configs_declare_the_paper_defaults_in_range(cls, name, default, lo, hi):
    s = field_spec(cls, name)
    assert (s.default, s.min, s.max) == (default, lo, hi)
    assert s.min <= s.default <= s.max
    assert s.doc, f"{cls.__name__}.{name} has no docstring naming its source"


def test_literal_fields_are_choices_of_their_values():
    from mpod_core.guidance.sds import WEIGHTINGS, SDSConfig
    spec = field_spec(SDSConfig, "weighting")
    assert (spec.kind, spec.options, spec.default) == (str, WEIGHTINGS, "sds")
    assert "DreamFusion" in spec.doc


def test_option_fields_offer_what_validate_accepts():
    assert field_spec(LayoutConfig, "loss").options == LOSSES
    for option in LOSSES:
        LayoutConfig(loss=option).validate()


def test_every_node_has_a_category():
    assert set(NODE_CATEGORIES) == set(NODE_DISPLAY_NAMES)
    assert all(c.startswith("MPOD3D") for c in NODE_CATEGORIES.values())
