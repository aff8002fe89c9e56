"""The formats ssl-bench keeps data in: plain arrays and JSON, each verified when read back."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_bench import integrity
from ssl_bench.integrity import Damaged, load_value, same_value as same, save_value


# ---- the codec the cache keeps values in ------------------------------------------------------------------

def engine_value():
    """What the composable engine keeps (segments, infos, sizes, features) and a head's trained weights."""
    rng = np.random.default_rng(0)
    return {
        "segments": [rng.integers(-1, 5, (4, 6)).astype(np.int16) for _ in range(3)],
        "infos": [{"n_valid": 3, "valid_sizes": [4, 2, 9], "score": 0.25, "backend": "igraph"}] * 3,
        "sizes": [(32, 48), (48, 32), (40, 40)],
        "features": rng.standard_normal((5, 7)).astype(np.float32),
        "weights": {"head.weight": rng.standard_normal((3, 7)), "head.bias": np.zeros(3, np.float64),
                    "mask": np.array([True, False]), "step": np.int64(12)},
        "tensor": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "edge": [None, True, float("nan"), -float("inf"), 2**70, "", {7: "int key"}, (), np.zeros((0, 3))],
    }


def test_kept_values_come_back_exactly(tmp_path):
    value = engine_value()
    save_value(tmp_path / "v.npz", value)
    back = load_value(tmp_path / "v.npz")
    assert same(value, back) and isinstance(back["sizes"][0], tuple) and type(back["weights"]["step"]) is int
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npz"]  # no temporary file left
    with np.load(tmp_path / "v.npz", allow_pickle=False) as npz:  # plain arrays only
        assert all(npz[name].dtype.kind in "biufc" for name in npz.files)


@pytest.mark.parametrize("value", [{"x": np.array(["text"])}, {"x": np.array([{}], dtype=object)}, {"x": object()},
                                   {(1, 2): 3}, [Path("/tmp")], torch.zeros(2, dtype=torch.bfloat16)])
def test_values_that_cannot_be_kept_are_refused_when_saved(tmp_path, value):
    with pytest.raises(TypeError):
        save_value(tmp_path / "v.npz", value)
    assert not list(tmp_path.iterdir())


def test_every_damaged_byte_of_a_kept_value_is_detected(tmp_path):
    value = {"segments": [np.arange(6, dtype=np.int16).reshape(2, 3)], "infos": [{"n": 1}], "sizes": [(2, 3)],
             "features": np.ones((2, 2), np.float32)}
    path = tmp_path / "v.npz"
    save_value(path, value)
    good = path.read_bytes()
    undetected = []
    for position in range(len(good)):
        for damaged in (good[:position] + bytes([good[position] ^ 0x10]) + good[position + 1:], good[:position]):
            path.write_bytes(damaged)
            try:
                back = load_value(path)
            except Damaged:
                continue
            if not same(value, back):
                undetected.append(position)
    assert not undetected, undetected[:10]  # each flip or truncation: refused, or (zip slack) the same value


def test_checked_json_refuses_any_change(tmp_path):
    path = tmp_path / "meta.json"
    integrity.write_checked_json(path, {"done": 12, "grids": [[2, 3]]})
    assert integrity.read_checked_json(path) == {"done": 12, "grids": [[2, 3]]}
    for text in (path.read_text().replace("12", "13"), path.read_text()[:-3], "", '{"done": 12}', "[1]"):
        path.write_text(text)
        with pytest.raises(Damaged):
            integrity.read_checked_json(path)
