"""mpod_core.loss_history: the LOSS_MAP layout every optimisation loop returns."""
import pytest

from mpod_core.loss_history import LossHistory


def test_terms_are_aligned_with_the_total_and_zero_where_absent():
    h = LossHistory()
    h.record(1.0, {"rgb": 0.5})
    h.record(2.0, {"sds": 4.0})
    h.record(3.0, {"rgb": 0.25, "sds": 1.0})
    assert len(h) == 3
    assert h.as_loss_map() == {"loss": [1.0, 2.0, 3.0], "rgb": [0.5, 0.0, 0.25], "sds": [0.0, 4.0, 1.0]}
    assert list(h.as_loss_map()) == ["loss", "rgb", "sds"]  # total first, terms as first seen


def test_values_are_plain_floats_and_the_map_is_a_copy():
    import torch
    h = LossHistory()
    h.record(torch.tensor(1.5), {"ot": torch.tensor(0.5)})
    lm = h.as_loss_map()
    assert type(lm["loss"][0]) is float and type(lm["ot"][0]) is float
    lm["loss"].append(9.0)
    assert h.as_loss_map()["loss"] == [1.5]


def test_a_term_named_like_the_total_is_refused():
    with pytest.raises(ValueError, match="'loss'"):
        LossHistory().record(1.0, {"loss": 1.0})
