"""The coordinate check measures what it says: one row per step, one column per layer, SP and μP alike at the base width."""

import numpy as np

from research.coord_check import layer_names, record, slopes


def test_records_every_layer_at_every_step_and_mup_at_its_base_is_sp(tiny_cfg):
    cfg = tiny_cfg(**{"tracking.enabled": False, "train.lr": 1e-2})
    sp = record(cfg, steps=3)
    assert sp.shape == (3, len(layer_names(cfg.model.num_hidden_layers))) and np.all(sp > 0)
    at_base = record(tiny_cfg(**{"tracking.enabled": False, "train.lr": 1e-2, "model.parametrization": "mup", "model.base_width": 64}), steps=3)
    assert np.allclose(sp, at_base, rtol=1e-6)
    assert not np.allclose(sp[0], sp[-1])  # training moved the activations


def test_slopes_read_growth_against_width():
    widths, layers = [64, 128, 256], ["embedding", "logits"]
    curves = {"sp": {str(w): [[1.0, w / 64]] for w in widths}, "mup": {str(w): [[1.0, 1.0]] for w in widths}}
    s = slopes({"widths": widths, "layers": layers, "curves": curves})
    assert abs(s["sp"]["logits"] - 1.0) < 1e-9
    assert abs(s["mup"]["logits"]) < 1e-9 and abs(s["sp"]["embedding"]) < 1e-9
