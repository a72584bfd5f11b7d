"""Models round-trip through nimbus.save / nimbus.load with identical outputs."""
import zipfile

import numpy as np
import pytest

import nimbus
import nimbus.nn as nn


def _data():
    Xtr, ytr, Xte, yte = nn.data.load_digits(random_state=0)
    return Xtr, ytr, Xte, yte


def _model(rng):
    return nn.Sequential(nn.Linear(64, 32, random_state=int(rng.integers(99))), nn.BatchNorm(32),
                         nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))


@pytest.mark.parametrize("fold", [False, True])
def test_converted_model_round_trip(tmp_path, rng, fold):
    Xtr, ytr, Xte, yte = _data()
    model = _model(rng)
    nn.convert(model, Xtr, ytr, depth=4, codebook_dim=8, pretrain_epochs=3, epochs_per_layer=1, finetune_epochs=0,
               fold=fold, random_state=int(rng.integers(99)))
    path = tmp_path / "model.npz"
    nimbus.save(model, path)
    back = nimbus.load(path)
    assert isinstance(back, nn.Sequential) and len(back) == len(model)
    assert [type(m) for m in back] == [type(m) for m in model]
    np.testing.assert_array_equal(back(Xte), model(Xte))
    assert [getattr(m, "mode", None) for m in back] == [getattr(m, "mode", None) for m in model]
    assert not back.training


def test_models_in_every_mode_round_trip(tmp_path, rng):
    Xtr, ytr, Xte, _ = _data()
    model = _model(rng).eval()
    nn.fit(model, Xtr, ytr, epochs=1, random_state=0)
    H = model[:4](Xtr)
    for mode in ("exact", "dm", "pq", "maddness"):
        if mode != "exact":
            model[4].use(mode, H, codebook_dim=8, random_state=0)
        nimbus.save(model, tmp_path / f"{mode}.npz")
        back = nimbus.load(tmp_path / f"{mode}.npz")
        assert back[4].mode == mode
        np.testing.assert_array_equal(back(Xte), model(Xte))
    # a loaded DM layer keeps training: its parameters are live tensors
    back = nimbus.load(tmp_path / "dm.npz")
    back[4].use("dm", H)
    assert len(back[4].parameters()) == 3


def test_conv_model_round_trip(tmp_path, rng):
    imgs = rng.standard_normal((10, 1, 6, 6)).astype(np.float32)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=(1, 2), padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 3)).eval()
    model[0].use("maddness", imgs, codebook_dim=9)
    nimbus.save(model, tmp_path / "conv.npz")
    back = nimbus.load(tmp_path / "conv.npz")
    assert back[0].stride == (1, 2)
    np.testing.assert_array_equal(back(imgs), model(imgs))


def test_corrupt_files_give_clear_errors(tmp_path, rng):
    model = _model(rng)
    path = tmp_path / "m.npz"
    nimbus.save(model, path)
    raw = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable nimbus file|corrupt"):
        nimbus.load(tmp_path / "cut.npz")
    # a file with an array missing
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(tmp_path / "miss.npz", "w") as out:
        for name in z.namelist():
            if not name.startswith("4/weight"):
                out.writestr(name, z.read(name))
    with pytest.raises(ValueError, match="incomplete or malformed"):
        nimbus.load(tmp_path / "miss.npz")
    (tmp_path / "junk.npz").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not a readable nimbus file"):
        nimbus.load(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        nimbus.load(tmp_path / "absent.npz")
