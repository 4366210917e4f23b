"""The calibration record layout (``<base>.npz`` beside ``<base>.json``) that relevance matrices and head rankings
share: what is written, what reading refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from auditor.engine.records import check_sha256, content_sha256, read_record, write_record
from auditor.errors import AuditorError

META = {"format": 1, "categories": ["colour"]}
ARRAYS = {"votes": np.array([[1, 2, 3]], np.int64), "matrix": np.array([[0.25, 0.5, 0.25]], np.float32)}


def _sha() -> str:
    return content_sha256(META, ((ARRAYS["matrix"], "<f4"), (ARRAYS["votes"], "<i8")))


def _write(tmp_path, created="2026-01-01T00:00:00+0000"):
    npz, side = tmp_path / "r.npz", tmp_path / "r.json"
    assert write_record(npz, side, ARRAYS, {**META, "sha256": _sha()}, created) == npz
    return npz, side


def _read(npz, side):
    return read_record(npz, side, ("matrix", "votes"), lambda meta, arrays: (meta["categories"], arrays),
                       "test record", "test file not found")


def test_content_hash_covers_metadata_and_array_bytes_in_their_dtype():
    assert _sha() == content_sha256(META, ((ARRAYS["matrix"].astype(np.float64), "<f4"), (ARRAYS["votes"], "<i8")))
    assert _sha() != content_sha256({**META, "format": 2}, ((ARRAYS["matrix"], "<f4"), (ARRAYS["votes"], "<i8")))
    assert _sha() != content_sha256(META, ((ARRAYS["matrix"], "<f8"), (ARRAYS["votes"], "<i8")))


def test_round_trip_keeps_arrays_and_the_side_in_order(tmp_path):
    npz, side = _write(tmp_path / "sub")  # the folder is made
    assert list(json.loads(side.read_text())) == ["format", "categories", "sha256", "created"]
    assert json.loads(side.read_text())["created"] == "2026-01-01T00:00:00+0000"
    (cats, arrays), meta = _read(npz, side)
    assert cats == ["colour"] and meta["sha256"] == _sha()
    for k, v in ARRAYS.items():
        assert arrays[k].dtype == v.dtype and np.array_equal(arrays[k], v)
    check_sha256(meta, _sha(), npz, side)
    assert sorted(np.load(npz).files) == ["matrix", "votes"]


def test_reading_refuses_missing_unreadable_and_altered_records(tmp_path):
    npz, side = _write(tmp_path)
    with pytest.raises(AuditorError, match=r"none\.json: test file not found"):
        _read(npz, side.with_name("none.json"))
    side.write_text(json.dumps({"format": 1}))
    with pytest.raises(AuditorError, match=r"r\.npz: unreadable test record \('categories'\)"):
        _read(npz, side)
    npz.write_bytes(b"not a zip")
    with pytest.raises(AuditorError, match="unreadable test record"):
        _read(npz, side)
    with pytest.raises(AuditorError, match="does not match the sha256 in r.json"):
        check_sha256({"sha256": "0" * 64}, _sha(), npz, side)
    check_sha256({}, _sha(), npz, side)  # a record stating no hash is not checked
