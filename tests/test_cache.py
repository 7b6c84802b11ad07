"""The HDF5 feature cache: round trip by key, atomic finish, schema/identity checks, strict resume.

Crash safety of the shard layout (OUT.parts/) and the CLI under kills: tests/test_extract_faults.py.
"""
from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from common.feature_cache import DONE, FAILED, PENDING, CacheError, CacheMeta, load_cache, parts_dir, read_meta
from stage1_extract.cache_writer import CacheWriter

D = 8


def _meta(**over) -> CacheMeta:
    m = CacheMeta(backbone="mobilenet_v2", weights="IMAGENET1K_V1", weights_sha256="", feature_dim=D,
                  preprocess='{"crop": 224}', dataset_format="coco", images_dir="/data/images",
                  captions_file="/data/captions.json", limit=-1, dtype="float32")
    return dataclasses.replace(m, **over)


KEYS = ["139", "285", "632", "724", "776"]


def _feats(n=len(KEYS), d=D, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _write_complete(out, keys=KEYS, meta=None, feats=None):
    meta = meta or _meta()
    feats = _feats(len(keys), meta.feature_dim) if feats is None else feats
    w = CacheWriter(out, keys, meta)
    w.write(np.arange(len(keys)), feats)
    w.finish()
    return feats


def test_round_trip_rows_written_out_of_order(tmp_path):
    out = tmp_path / "f.h5"
    feats = _feats()
    w = CacheWriter(out, KEYS, _meta())
    assert not w.resumed
    w.write(np.array([3, 0]), feats[[3, 0]])  # unsorted rows
    w.write(np.array([4, 1, 2]), feats[[4, 1, 2]])
    assert (w.status() == DONE).all()
    w.finish()
    c = load_cache(out)
    assert c.keys == KEYS
    assert c.meta == _meta()
    rows = c.rows_by_key()
    assert rows == {k: i for i, k in enumerate(KEYS)}
    for i, k in enumerate(KEYS):
        np.testing.assert_array_equal(c.features[rows[k]], feats[i])
    assert c.errors == {}


def test_float16_cache_stores_half_precision(tmp_path):
    out = tmp_path / "f16.h5"
    feats = _write_complete(out, meta=_meta(dtype="float16"))
    c = load_cache(out)
    assert c.features.dtype == np.float16
    np.testing.assert_allclose(c.features.astype(np.float32), feats, rtol=1e-3, atol=1e-3)


def test_failed_rows_are_recorded_and_excluded(tmp_path):
    out = tmp_path / "f.h5"
    feats = _feats()
    w = CacheWriter(out, KEYS, _meta())
    w.write(np.array([0, 1, 3, 4]), feats[[0, 1, 3, 4]])
    w.fail(2, "broken.jpg: OSError: truncated")
    w.finish()
    c = load_cache(out)
    assert c.errors == {"632": "broken.jpg: OSError: truncated"}
    assert "632" not in c.rows_by_key() and len(c.rows_by_key()) == 4
    assert c.status.tolist() == [DONE, DONE, FAILED, DONE, DONE]


def test_file_appears_at_final_name_only_after_finish(tmp_path):
    out = tmp_path / "f.h5"
    w = CacheWriter(out, KEYS, _meta())
    try:
        assert parts_dir(out).is_dir() and not out.exists()
        assert parts_dir(out) == tmp_path / "f.h5.parts"
        assert (parts_dir(out) / "meta.json").is_file()
        w.write(np.arange(len(KEYS)), _feats())
        w.flush()
        assert [p.name for p in parts_dir(out).glob("*.npz")] == ["rank000-000000.npz"]  # one shard per write
        assert not out.exists()
        with pytest.raises(CacheError, match="not finished"):
            load_cache(out)
        w.finish()
    finally:
        w.close()
    assert out.is_file() and not parts_dir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]  # no scratch files left
    with h5py.File(out, "r") as f:
        assert bool(f.attrs["complete"])


def test_finish_refuses_pending_rows(tmp_path):
    out = tmp_path / "f.h5"
    w = CacheWriter(out, KEYS, _meta())
    w.write(np.array([0, 1]), _feats()[:2])
    with pytest.raises(CacheError, match="3 rows still pending"):
        w.finish()
    w.close()
    assert not out.exists() and parts_dir(out).is_dir()


def test_resume_keeps_done_rows(tmp_path):
    out = tmp_path / "f.h5"
    feats = _feats()
    w = CacheWriter(out, KEYS, _meta())
    w.write(np.array([1, 3]), feats[[1, 3]])
    w.close()  # "crash"
    w2 = CacheWriter(out, KEYS, _meta())
    assert w2.resumed
    assert w2.status().tolist() == [PENDING, DONE, PENDING, DONE, PENDING]
    w2.write(np.array([0, 2, 4]), feats[[0, 2, 4]])
    w2.finish()
    np.testing.assert_array_equal(load_cache(out).features, feats)


@pytest.mark.parametrize("change", [dict(backbone="resnet152", feature_dim=D), dict(feature_dim=D + 1),
                                    dict(weights="none"), dict(dtype="float16"), dict(preprocess="{}")])
def test_resume_with_other_meta_raises(tmp_path, change):
    out = tmp_path / "f.h5"
    w = CacheWriter(out, KEYS, _meta())
    w.write(np.array([0]), _feats()[:1])
    w.close()
    with pytest.raises(CacheError) as ei:
        CacheWriter(out, KEYS, _meta(**change))
    field = next(iter(change))
    assert field in str(ei.value) and "f.h5.parts" in str(ei.value)
    again = CacheWriter(out, KEYS, _meta())  # the unfinished work is untouched and still resumable
    assert again.resumed and again.status()[0] == DONE
    again.close()


def test_resume_with_other_keys_raises(tmp_path):
    out = tmp_path / "f.h5"
    CacheWriter(out, KEYS, _meta()).close()
    with pytest.raises(CacheError, match="image list differs"):
        CacheWriter(out, KEYS[:3], _meta())


def test_load_with_other_backbone_names_both(tmp_path):
    out = tmp_path / "f.h5"
    _write_complete(out)
    with pytest.raises(CacheError) as ei:
        load_cache(out, backbone="resnet152")
    msg = str(ei.value)
    assert "'mobilenet_v2'" in msg and "'resnet152'" in msg and str(out) in msg


def test_load_with_other_feature_dim_names_both(tmp_path):
    out = tmp_path / "f.h5"
    _write_complete(out)
    with pytest.raises(CacheError) as ei:
        load_cache(out, feature_dim=2048)
    msg = str(ei.value)
    assert str(D) in msg and "2048" in msg
    # the matching identity loads fine
    assert load_cache(out, backbone="mobilenet_v2", feature_dim=D).features.shape == (len(KEYS), D)


def test_load_with_other_preprocess_raises(tmp_path):
    out = tmp_path / "f.h5"
    _write_complete(out)
    with pytest.raises(CacheError, match="preprocessing"):
        load_cache(out, preprocess='{"crop": 256}')


def test_non_hdf5_file_raises(tmp_path):
    bad = tmp_path / "notes.h5"
    bad.write_text("this is not an HDF5 file\n")
    with pytest.raises(CacheError) as ei:
        load_cache(bad)
    assert str(bad) in str(ei.value)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(CacheError):
        load_cache(empty)


def test_missing_file_raises(tmp_path):
    with pytest.raises(CacheError, match="not found"):
        load_cache(tmp_path / "absent.h5")


def test_hdf5_without_schema_raises(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 3)))
    with pytest.raises(CacheError, match="not a capcache feature cache"):
        load_cache(p)
    with pytest.raises(CacheError):
        read_meta(p)


def test_other_schema_version_raises(tmp_path):
    out = tmp_path / "f.h5"
    _write_complete(out)
    with h5py.File(out, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="version 99"):
        load_cache(out)


def test_incomplete_flag_raises(tmp_path):
    out = tmp_path / "f.h5"
    _write_complete(out)
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match="incomplete"):
        load_cache(out)


def test_real_cache_attributes(shared_cache):
    """The stage-1 cache made by the shared fixture is stamped with how it was made."""
    from common.backbones import preprocess_for

    c = load_cache(shared_cache, backbone="mobilenet_v2", feature_dim=1280,
                   preprocess=preprocess_for("mobilenet_v2").describe())
    assert c.meta.dataset_format == "coco" and c.meta.limit == 48 and c.meta.dtype == "float16"
    assert c.features.shape == (48, 1280) and np.isfinite(c.features).all()
    assert (c.status == DONE).all()
    assert len(set(map(bytes, c.features.view(np.uint8)))) == 48  # every image has its own feature
