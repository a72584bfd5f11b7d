"""nimbus.nn.compile: the compiled plan gives the model's outputs bitwise, saves only what
inference needs, and refuses bad models and bad inputs with errors that name the problem."""
import json
import zipfile

import numpy as np
import pytest

import nimbus
import nimbus.nn as nn
from nimbus.arrays import backend
from nimbus.nn.cli import build_mlp


def _data():
    return nn.data.load_digits(random_state=0)


def _mlp(seed, sizes=(64, 32, 16, 10)):
    return build_mlp(list(sizes), seed=seed)        # Linear -> BatchNorm -> ReLU, then Linear


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted, int8, folded digits MLP (depth 5: K = 32) and its unfolded twin."""
    Xtr, ytr, Xte, yte = _data()
    model = _mlp(3)
    nn.fit(model, Xtr, ytr, epochs=6, batch_size=64, random_state=0)
    float_model = nimbus.load(_save(model, tmp_path_factory.mktemp("m") / "float.npz"))
    nn.convert(model, Xtr, ytr, depth=5, codebook_dim=4, epochs_per_layer=1,
               finetune_epochs=0, batch_size=64, random_state=1)
    return model, float_model, Xte, yte


def _save(obj, path):
    nimbus.save(obj, path)
    return path


def test_compiled_equals_model(converted):
    model, _, Xte, _ = converted
    compiled = nn.compile(model)
    assert [s["op"] for s in compiled.steps] == ["lut", "lut", "lut"]
    np.testing.assert_array_equal(compiled(Xte), model(Xte))
    np.testing.assert_array_equal(compiled(Xte[:1]), model(Xte[:1]))
    np.testing.assert_array_equal(compiled.predict(Xte), model.predict(Xte))
    # integer pixels and float64 are coerced as the model does; outputs are fresh arrays
    X64 = Xte.astype(np.float64)
    a = compiled(X64)
    b = compiled(X64)
    assert a is not b
    np.testing.assert_array_equal(a, model(Xte))
    # a non-contiguous view too
    np.testing.assert_array_equal(compiled(Xte[::2]), model(Xte[::2]))


def test_save_load_keeps_only_inference_arrays(converted, tmp_path):
    model, float_model, Xte, _ = converted
    compiled = nn.compile(model)
    path = _save(compiled, tmp_path / "c.npz")
    back = nimbus.load(path)
    assert isinstance(back, nn.CompiledModel)
    np.testing.assert_array_equal(back(Xte), compiled(Xte))
    with zipfile.ZipFile(path) as z:
        names = {n.rsplit("/", 1)[-1].removesuffix(".npy") for n in z.namelist()}
    assert names <= {"dims", "thresholds", "lut", "scale", "bias", "weight", "a", "b",
                     "__nimbus__"}
    # 8-bit LUTs: C * K * M bytes per layer, plus the trees and two (M,) vectors
    want = sum(s["lut"].nbytes + s["dims"].nbytes + s["thresholds"].nbytes
               + s["scale"].nbytes + s["bias"].nbytes for s in compiled.steps)
    assert compiled.nbytes == want
    assert all(s["lut"].dtype == np.uint8 for s in compiled.steps)


def test_dense_layers_and_unfolded_relu_run_in_the_plan():
    Xtr, ytr, Xte, _ = _data()
    model = nn.Sequential(nn.Linear(64, 32, random_state=0), nn.ReLU(),
                          nn.Linear(32, 10, random_state=1))
    nn.fit(model, Xtr, ytr, epochs=3, batch_size=64, random_state=0)
    model[0].use("maddness", Xtr, ncodebooks=16)
    folded = nn.fold(model)
    compiled = nn.compile(folded)
    assert [s["op"] for s in compiled.steps] == ["lut", "relu", "dense"]
    np.testing.assert_allclose(compiled(Xte), folded(Xte), rtol=1e-6, atol=1e-6)


def test_unconverted_not_int8_not_folded_and_trainable_models_are_refused():
    Xtr, ytr, _, _ = _data()
    with pytest.raises(ValueError, match="not converted"):
        nn.compile(_mlp(0))
    with pytest.raises(TypeError, match="nimbus.nn model"):
        nn.compile(np.zeros(3))
    kw = dict(depth=4, epochs_per_layer=0, finetune_epochs=0, batch_size=64, random_state=0)
    m = _mlp(0)
    nn.convert(m, Xtr, ytr, int8=False, **kw)
    with pytest.raises(ValueError, match="float LUT.*int8"):
        nn.compile(m)
    m = _mlp(0)
    nn.convert(m, Xtr, ytr, fold=False, **kw)
    with pytest.raises(ValueError, match="not folded"):
        nn.compile(m)
    m = _mlp(0)
    conv = nn.Conversion(m, Xtr, ytr, **kw)
    conv.layers()                         # mid-conversion: the layers are still trainable
    with pytest.raises(ValueError, match="trainable.*int8"):
        nn.compile(m)
    conv_net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 10))
    with pytest.raises(ValueError, match="Conv2d"):
        nn.compile(conv_net)


def test_bad_inputs_are_refused(converted):
    model, _, Xte, _ = converted
    compiled = nn.compile(model)
    with pytest.raises(ValueError, match="50 features.*64"):
        compiled(Xte[:, :50])
    bad = Xte[:5].copy()
    bad[2, 7] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        compiled(bad)
    bad[2, 7] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        compiled(bad)
    with pytest.raises(ValueError, match="empty"):
        compiled(Xte[:0])
    with pytest.raises(ValueError, match="2-D"):
        compiled(Xte[0])
    with pytest.raises(TypeError, match="real numbers"):
        compiled(Xte > 0.5)
    with pytest.raises(TypeError, match="real numbers"):
        compiled(Xte.astype(np.complex64))
    with pytest.raises(TypeError, match="NumPy or CuPy"):
        compiled(Xte.tolist())
    # huge finite values are not mistaken for Inf (their float32 sum overflows)
    big = np.full((3, 64), 3e38, dtype=np.float32)
    assert compiled(big).shape == (3, 10)


def _nan_rows_check(compiled, X, xp):
    """check_finite="nan" on X (2-D array of xp): rows 1 and 4 spoiled (NaN, -Inf) give
    NaN logits and class -1; every other row the bits of the clean call; no error."""
    want = compiled(X)
    bad = X.copy()
    bad[1, 3] = xp.nan
    bad[4, -1] = -xp.inf
    got = compiled(bad, check_finite="nan")
    got, want = backend.to_host(got), backend.to_host(want)
    spoiled = np.zeros(len(want), dtype=bool)
    spoiled[[1, 4]] = True
    assert np.isnan(got[spoiled]).all()
    np.testing.assert_array_equal(got[~spoiled], want[~spoiled])
    ids = backend.to_host(compiled.predict(bad, check_finite="nan"))
    np.testing.assert_array_equal(ids[spoiled], -1)
    np.testing.assert_array_equal(ids[~spoiled], want[~spoiled].argmax(axis=1))
    # a clean input is untouched by the mode
    np.testing.assert_array_equal(backend.to_host(compiled(X, check_finite="nan")), want)


def test_check_finite_nan_marks_rows(converted):
    model, _, Xte, _ = converted
    compiled = nn.compile(model)
    _nan_rows_check(compiled, Xte[:300], np)
    for mode in ("raise", 1, None):
        with pytest.raises(ValueError, match="check_finite must be"):
            compiled(Xte[:3], check_finite=mode)


def test_check_finite_nan_through_float_steps():
    """A float first layer carries the NaN row to the chain, which marks it."""
    Xtr, ytr, Xte, _ = _data()
    model = nn.Sequential(nn.Linear(64, 32, random_state=0), nn.ReLU(),
                          nn.Linear(32, 10, random_state=1))
    nn.fit(model, Xtr, ytr, epochs=2, batch_size=64, random_state=0)
    model[2].use("maddness", model[1](model[0](Xtr)), ncodebooks=8)
    compiled = nn.compile(nn.fold(model))
    assert [s["op"] for s in compiled.steps] == ["dense", "lut"]      # ReLU folded in
    _nan_rows_check(compiled, Xte[:50], np)


def test_old_or_foreign_artifacts_are_refused(converted, tmp_path):
    model, _, _, _ = converted
    path = _save(nn.compile(model), tmp_path / "c.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    doc = json.loads(str(arrays["__nimbus__"][()]))
    doc["meta"]["format_version"] = 0                 # a layout this version does not read
    arrays["__nimbus__"] = np.array(json.dumps(doc))
    old = tmp_path / "old.npz"
    np.savez(old, **arrays)
    with pytest.raises(ValueError, match="format version is 0"):
        nimbus.load(old)
    doc["meta"]["format_version"] = 1
    del arrays["0/lut"]
    arrays["__nimbus__"] = np.array(json.dumps(doc))
    np.savez(old, **arrays)
    with pytest.raises(ValueError, match="malformed|incomplete"):
        nimbus.load(old)
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        nimbus.load(tmp_path / "x.npy")


@pytest.mark.gpu
def test_gpu_compiled_equals_cpu_and_model(converted, tmp_path):
    cp = pytest.importorskip("cupy")
    model, _, Xte, _ = converted
    compiled = nn.compile(model)
    Xg = cp.asarray(Xte)
    Yg = compiled(Xg)
    assert backend.is_cupy(Yg)
    np.testing.assert_array_equal(cp.asnumpy(Yg), compiled(Xte))       # GPU == CPU
    gmodel = nimbus.load(_save(model, tmp_path / "conv.npz")).to(Xg)
    np.testing.assert_array_equal(cp.asnumpy(Yg), cp.asnumpy(gmodel(Xg)))
    np.testing.assert_array_equal(cp.asnumpy(compiled(Xg, check_finite=False)), cp.asnumpy(Yg))
    bad = Xg[:4].copy()
    bad[1, 3] = cp.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        compiled(bad)
    for n in (1, 16, 257):                 # graphs per batch size, sizes interleaved
        np.testing.assert_array_equal(cp.asnumpy(compiled(Xg[:n])), compiled(Xte[:n]))
    _nan_rows_check(compiled, Xg[:300], cp)               # the simt kernel's row flags
    _nan_rows_check(compiled, cp.concatenate([Xg] * 4), cp)   # the tensor cores' (1024+)
