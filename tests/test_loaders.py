"""Loaders: files written in each published layout with random content, read
back and checked against NumPy; files missing a key must name it."""
import json
import pickle
import sys
import types

import h5py
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrender.morphable as M
from jaxrender.morphable.flame import flame_forward, load_flame
from jaxrender.morphable.loaders import ModelFileError, load_bfm, load_deep3d, load_faceverse, save_bfm

from .test_morphable import _fake_flame_dict, _np_flame

V, F = 50, 70


def _tri(rng, n=F):
    return np.stack([rng.permutation(V)[:3] for _ in range(n)])


# ----------------------------------------------------------------------------
# Basel Face Model (HDF5)


def _orthonormal(rng, k):
    q, _ = np.linalg.qr(rng.normal(size=(3 * V, k)))
    return q


def _write_bfm(path, rng, drop=None, landmarks=True, bad=None):
    data = {
        "shape/model/mean": rng.normal(size=3 * V) * 50,
        "shape/model/pcaBasis": _orthonormal(rng, 6),
        "shape/model/pcaVariance": rng.uniform(1, 100, size=6),
        "shape/representer/points": rng.normal(size=(3, V)),
        "shape/representer/cells": _tri(rng).T.astype(np.uint32),
        "color/model/mean": rng.uniform(0, 1, size=3 * V),
        "color/model/pcaBasis": _orthonormal(rng, 4),
        "color/model/pcaVariance": rng.uniform(0.001, 0.01, size=4),
        "expression/model/mean": rng.normal(size=3 * V),
        "expression/model/pcaBasis": _orthonormal(rng, 5),
        "expression/model/pcaVariance": rng.uniform(1, 10, size=5),
    }
    if bad:
        data[bad] = data[bad][..., :-1]
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            if k != drop:
                f.create_dataset(k, data=v)
        if landmarks:
            mean = (data["shape/model/mean"] + data["expression/model/mean"]).reshape(V, 3)
            lm = [{"id": f"pt{i}", "coordinates": (mean[j] + 0.01).tolist(), "uncertainty": [1, 1, 1]} for i, j in enumerate([3, 7, 11])]
            f.create_dataset("metadata/landmarks/json", data=json.dumps(lm))
    return data


def test_load_bfm_matches_numpy(tmp_path, rng):
    p = tmp_path / "bfm.h5"
    d = _write_bfm(p, rng)
    m = load_bfm(p)
    mean = (d["shape/model/mean"] + d["expression/model/mean"]).reshape(V, 3)
    np.testing.assert_allclose(m.mean_shape, mean, rtol=1e-5)
    idb = (d["shape/model/pcaBasis"] * np.sqrt(d["shape/model/pcaVariance"])).reshape(V, 3, 6)
    np.testing.assert_allclose(m.id_basis, idb, rtol=1e-5, atol=1e-6)
    expb = (d["expression/model/pcaBasis"] * np.sqrt(d["expression/model/pcaVariance"])).reshape(V, 3, 5)
    np.testing.assert_allclose(m.exp_basis, expb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.mean_albedo, d["color/model/mean"].reshape(V, 3), rtol=1e-6)
    np.testing.assert_array_equal(m.faces, d["shape/representer/cells"].T)
    np.testing.assert_array_equal(m.landmark_indices, [3, 7, 11])
    assert m.landmark_names == ("pt0", "pt1", "pt2")
    np.testing.assert_allclose(m.id_variance, d["shape/model/pcaVariance"], rtol=1e-6)
    # evaluation against NumPy
    a, e = rng.normal(size=6), rng.normal(size=5)
    np.testing.assert_allclose(M.shape(m, a, e), mean + idb @ a + expb @ e, rtol=1e-4, atol=1e-3)
    # scale and truncation
    m2 = load_bfm(p, scale=0.01, n_id=2, n_exp=1, n_albedo=3)
    assert (m2.num_id, m2.num_exp, m2.num_albedo) == (2, 1, 3)
    np.testing.assert_allclose(m2.mean_shape, mean * 0.01, rtol=1e-5)
    np.testing.assert_allclose(m2.id_basis, idb[..., :2] * 0.01, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("key", ["shape/model/mean", "shape/model/pcaBasis", "color/model/pcaVariance",
                                 "shape/representer/cells", "expression/model/pcaBasis"])
def test_load_bfm_missing_key_is_named(tmp_path, rng, key):
    p = tmp_path / "bfm.h5"
    _write_bfm(p, rng, drop=key)
    with pytest.raises(ModelFileError, match=key):
        load_bfm(p)


@pytest.mark.parametrize("key", ["shape/model/pcaVariance", "color/model/mean", "expression/model/pcaBasis"])
def test_load_bfm_mismatched_key_is_named(tmp_path, rng, key):
    p = tmp_path / "bfm.h5"
    _write_bfm(p, rng, bad=key)
    with pytest.raises(ModelFileError, match=key):
        load_bfm(p)


def test_load_bfm_without_expression_or_landmarks(tmp_path, rng):
    p = tmp_path / "bfm.h5"
    d = _write_bfm(p, rng, landmarks=False)
    with h5py.File(p, "a") as f:
        del f["expression"]
    m = load_bfm(p)
    assert m.num_exp == 0 and m.num_landmarks == 0
    np.testing.assert_allclose(m.mean_shape, d["shape/model/mean"].reshape(V, 3), rtol=1e-6)


def test_save_bfm_roundtrip(tmp_path, rng):
    m = load_bfm(_write_bfm(tmp_path / "a.h5", rng) and tmp_path / "a.h5")
    m = M.MorphableModel(m.mean_shape, m.id_basis, m.exp_basis, m.mean_albedo, m.albedo_basis, m.faces,
                         m.landmark_indices, masks={"face": np.linspace(0, 1, V)}, eye_ranges=((40, 45), (45, 50)),
                         landmark_names=("a", "b", "c"))
    save_bfm(m, tmp_path / "b.h5")
    with h5py.File(tmp_path / "b.h5", "r") as f:  # the Basel layout, 3 x N
        assert f["shape/representer/cells"].shape == (3, m.num_faces)
        assert f["shape/representer/points"].shape == (3, V)
        basis = f["shape/model/pcaBasis"][()]
        np.testing.assert_allclose(np.linalg.norm(basis, axis=0), 1, rtol=1e-5)
    r = load_bfm(tmp_path / "b.h5")
    for k in ("mean_shape", "id_basis", "exp_basis", "mean_albedo", "albedo_basis", "faces", "landmark_indices"):
        np.testing.assert_allclose(getattr(r, k), getattr(m, k), rtol=1e-5, atol=1e-5, err_msg=k)
    assert r.eye_ranges == ((40, 45), (45, 50)) and r.landmark_names == ("a", "b", "c")
    np.testing.assert_allclose(r.masks["face"], np.linspace(0, 1, V), rtol=1e-6)
    # scale round trip
    save_bfm(m, tmp_path / "c.h5", scale=0.01)
    np.testing.assert_allclose(load_bfm(tmp_path / "c.h5", scale=0.01).mean_shape, m.mean_shape, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# FaceVerse (.npy pickled dict)


def _faceverse_dict(rng, version="v3", k=(6, 5, 4)):
    ki, ke, ka = k
    d = {
        "meanshape": rng.normal(size=3 * V) * 100 if version == "v3" else rng.normal(size=(V, 3)) * 100,
        "idBase": rng.normal(size=(3 * V, ki)),
        "exBase": rng.normal(size=(3 * V, ke)),
        "texBase": rng.normal(size=(3 * V, ka)) * 10,
        "meantex": rng.uniform(0, 255, size=3 * V),
        "tri": _tri(rng),
        "point_buf": np.zeros((V, 8), np.int64),
        "ver_inds": np.array([40, 45, 50]),
        "tri_inds": np.array([60, 65, 70]),
        "uv": rng.uniform(size=(V, 2)),
        "tri_uv": _tri(rng),
    }
    kp = rng.choice(40, size=10, replace=False)
    d["mediapipe_keypoints" if version == "v3" else "keypoints_mediapipe"] = kp
    return d


def test_load_faceverse_v3_follows_reference(tmp_path, rng):
    d = _faceverse_dict(rng)
    np.save(tmp_path / "fv.npy", d)
    m = load_faceverse(tmp_path / "fv.npy")
    # the FaceVerse v3 model code: negate y and z, scale by 0.1, shift y by +1
    mean = d["meanshape"].reshape(-1, 3).copy()
    mean[:, [1, 2]] *= -1
    mean = mean * 0.1
    mean[:, 1] += 1
    idb = d["idBase"].reshape(-1, 3, 6).copy()
    idb[:, [1, 2]] *= -1
    np.testing.assert_allclose(m.mean_shape, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.id_basis, idb * 0.1, rtol=1e-5, atol=1e-6)
    exb = d["exBase"].reshape(-1, 3, 5).copy()
    exb[:, [1, 2]] *= -1
    np.testing.assert_allclose(m.exp_basis, exb * 0.1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.mean_albedo, d["meantex"].reshape(V, 3) / 255, rtol=1e-5)
    np.testing.assert_allclose(m.albedo_basis, d["texBase"].reshape(V, 3, 4) / 255, rtol=1e-5)
    np.testing.assert_array_equal(m.faces, d["tri"])
    np.testing.assert_array_equal(m.landmark_indices, d["mediapipe_keypoints"])
    assert m.eye_ranges == ((40, 45), (45, 50))
    assert m.uvs.shape == (V, 2) and m.face_uvs.shape == (F, 3)
    # the official jittor v3 scale
    m2 = load_faceverse(tmp_path / "fv.npy", scale=0.01, y_offset=0.0)
    mean2 = d["meanshape"].reshape(-1, 3) * np.array([1, -1, -1]) * 0.01
    np.testing.assert_allclose(m2.mean_shape, mean2, rtol=1e-5, atol=1e-6)


def test_load_faceverse_v4(tmp_path, rng):
    d = _faceverse_dict(rng, "v4")
    np.save(tmp_path / "fv4.npy", d)
    m = load_faceverse(tmp_path / "fv4.npy")
    np.testing.assert_allclose(m.mean_shape, d["meanshape"] / 100, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.id_basis, d["idBase"].reshape(V, 3, 6) / 100, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(m.landmark_indices, d["keypoints_mediapipe"])


@pytest.mark.parametrize("key", ["meanshape", "idBase", "exBase", "texBase", "meantex", "tri"])
def test_load_faceverse_missing_key_is_named(tmp_path, rng, key):
    d = _faceverse_dict(rng)
    del d[key]
    np.save(tmp_path / "fv.npy", d)
    with pytest.raises(ModelFileError, match=f"'{key}'"):
        load_faceverse(tmp_path / "fv.npy")


def test_load_faceverse_mismatch_is_named(tmp_path, rng):
    d = _faceverse_dict(rng)
    d["texBase"] = d["texBase"][:-3]
    np.save(tmp_path / "fv.npy", d)
    with pytest.raises(ModelFileError, match="'texBase'.*shape"):
        load_faceverse(tmp_path / "fv.npy")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    with pytest.raises(ModelFileError, match="dict"):
        load_faceverse(tmp_path / "arr.npy")


# ----------------------------------------------------------------------------
# Deep3DFaceRecon BFM_model_front.mat


def _deep3d_dict(rng):
    return {
        "meanshape": rng.normal(size=(1, 3 * V)),
        "idBase": rng.normal(size=(3 * V, 8)),
        "exBase": rng.normal(size=(3 * V, 6)),
        "meantex": rng.uniform(0, 255, size=(1, 3 * V)),
        "texBase": rng.normal(size=(3 * V, 8)) * 20,
        "tri": _tri(rng) + 1,
        "point_buf": rng.integers(1, F + 1, size=(V, 8)),
        "keypoints": (rng.choice(V, size=68) + 1).astype(np.float64)[None],
        "frontmask2_idx": np.arange(1, 21)[:, None],
        "skinmask": rng.integers(0, 2, size=(1, V)),
    }


def test_load_deep3d(tmp_path, rng):
    sio = pytest.importorskip("scipy.io")
    d = _deep3d_dict(rng)
    sio.savemat(tmp_path / "BFM_model_front.mat", d)
    m = load_deep3d(tmp_path / "BFM_model_front.mat")
    mean = d["meanshape"].reshape(V, 3)
    np.testing.assert_allclose(m.mean_shape, mean - mean.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.id_basis, d["idBase"].reshape(V, 3, 8), rtol=1e-6)
    np.testing.assert_allclose(m.mean_albedo, d["meantex"].reshape(V, 3) / 255, rtol=1e-6)
    np.testing.assert_allclose(m.albedo_basis, d["texBase"].reshape(V, 3, 8) / 255, rtol=1e-6)
    np.testing.assert_array_equal(m.faces, d["tri"] - 1)
    np.testing.assert_array_equal(m.landmark_indices, d["keypoints"].reshape(-1) - 1)
    assert float(m.masks["front"][:20].sum()) == 20 and float(m.masks["front"][20:].sum()) == 0
    np.testing.assert_array_equal(m.masks["skin"], d["skinmask"].reshape(-1))
    np.testing.assert_allclose(load_deep3d(tmp_path / "BFM_model_front.mat", recenter=False).mean_shape, mean, rtol=1e-6)
    d2 = dict(d)
    del d2["exBase"]
    sio.savemat(tmp_path / "bad.mat", d2)
    with pytest.raises(ModelFileError, match="'exBase'"):
        load_deep3d(tmp_path / "bad.mat")


# ----------------------------------------------------------------------------
# FLAME (.npz and chumpy .pkl without chumpy)


def test_load_flame_npz(tmp_path, rng):
    d = _fake_flame_dict(rng, V=30, n_shape=6, n_exp=4)
    np.savez(tmp_path / "flame.npz", **d)
    m = load_flame(tmp_path / "flame.npz", num_shape_components=6)
    assert m.parents == (-1, 0, 1, 1, 1)
    assert m.shapedirs.shape == (30, 3, 6) and m.exprdirs.shape == (30, 3, 4)
    s, e, p = rng.normal(size=6), rng.normal(size=4), 0.3 * rng.normal(size=(5, 3))
    np.testing.assert_allclose(flame_forward(m, s, e, p), _np_flame(d, s, e, p, 6), rtol=1e-4, atol=1e-4)
    m2 = load_flame(tmp_path / "flame.npz", num_shape_components=6, n_shape=2, n_exp=1)
    assert m2.shapedirs.shape[-1] == 2 and m2.exprdirs.shape[-1] == 1
    d2 = dict(d)
    del d2["weights"]
    np.savez(tmp_path / "bad.npz", **d2)
    with pytest.raises(ModelFileError, match="'weights'"):
        load_flame(tmp_path / "bad.npz", num_shape_components=6)
    with pytest.raises(ModelFileError, match="'shapedirs'"):
        load_flame(tmp_path / "flame.npz")  # 10 components < 300


class _FakeCh:
    """Pickles like a chumpy leaf: its state dict holds the array under 'x'."""

    def __init__(self, x):
        self.x = x
        self._dirty_vars = set()
        self._itr = None


class _FakeCsc:
    def __init__(self, dense):
        cols = [np.nonzero(dense[:, j])[0] for j in range(dense.shape[1])]
        self.indices = np.concatenate(cols)
        self.indptr = np.concatenate([[0], np.cumsum([len(c) for c in cols])])
        self.data = np.concatenate([dense[c, j] for j, c in enumerate(cols)])
        self._shape = dense.shape
        self.maxprint = 50


def _pickle_with_fake_classes(obj, path):
    """Write a pickle whose classes live in 'chumpy.ch' and a fake scipy.sparse
    module, then remove those modules so that loading cannot import them."""
    mods = {"chumpy": types.ModuleType("chumpy"), "chumpy.ch": types.ModuleType("chumpy.ch"),
            "scipy.sparse._jaxrender_fake": types.ModuleType("scipy.sparse._jaxrender_fake")}
    _FakeCh.__module__, _FakeCh.__qualname__ = "chumpy.ch", "Ch"
    _FakeCsc.__module__, _FakeCsc.__qualname__ = "scipy.sparse._jaxrender_fake", "csc_matrix"
    mods["chumpy.ch"].Ch = _FakeCh
    mods["scipy.sparse._jaxrender_fake"].csc_matrix = _FakeCsc
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        _FakeCh.__module__, _FakeCh.__qualname__ = __name__, "_FakeCh"
        _FakeCsc.__module__, _FakeCsc.__qualname__ = __name__, "_FakeCsc"


def test_load_flame_pkl_without_chumpy(tmp_path, rng):
    assert "chumpy" not in sys.modules
    d = _fake_flame_dict(rng, V=30, n_shape=6, n_exp=4)
    obj = dict(d)
    obj["shapedirs"] = _FakeCh(d["shapedirs"])
    obj["v_template"] = _FakeCh(d["v_template"])
    obj["J_regressor"] = _FakeCsc(d["J_regressor"])
    obj["bs_style"] = "lbs"
    _pickle_with_fake_classes(obj, tmp_path / "generic_model.pkl")
    with pytest.raises(ModuleNotFoundError):
        pickle.load(open(tmp_path / "generic_model.pkl", "rb"))
    m = load_flame(tmp_path / "generic_model.pkl", num_shape_components=6)
    np.testing.assert_allclose(m.J_regressor, d["J_regressor"], rtol=1e-6)
    np.testing.assert_allclose(m.v_template, d["v_template"], rtol=1e-6)
    s, e, p = rng.normal(size=6), rng.normal(size=4), 0.3 * rng.normal(size=(5, 3))
    np.testing.assert_allclose(flame_forward(m, jnp.asarray(s), e, p), _np_flame(d, s, e, p, 6), rtol=1e-4, atol=1e-4)


def test_load_flame_pkl_with_scipy_sparse(tmp_path, rng):
    sp = pytest.importorskip("scipy.sparse")
    d = _fake_flame_dict(rng, V=30, n_shape=6, n_exp=4)
    obj = dict(d)
    obj["J_regressor"] = sp.csc_matrix(d["J_regressor"])
    with open(tmp_path / "m.pkl", "wb") as fh:
        pickle.dump(obj, fh)
    m = load_flame(tmp_path / "m.pkl", num_shape_components=6)
    np.testing.assert_allclose(m.J_regressor, d["J_regressor"], rtol=1e-6)
