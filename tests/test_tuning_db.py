# SPDX-License-Identifier: Apache-2.0
"""The per-GPU tuning database (kvkern.tuning) and the tuner (python -m autotune), on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

from kvkern import reference, tuning
from kvkern.ops import DECODE_ATTENTION_TUNING as SPEC

from utils import TOLERANCES, assert_verbose_allclose, isolate_tuning_database, make_decode_inputs

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the autotune package lives at the repository root
    sys.path.insert(0, str(REPO))

DEV = "NVIDIA_H200"
STATIC = {"head_dim": 128, "dtype": "bf16", "group": 4}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No user dir, and no packaged or source-tree database unless a test points at one."""
    isolate_tuning_database(monkeypatch, tmp_path)
    yield
    tuning.clear_caches()


def make_meta(device=DEV, **over):
    meta = {"schema": 1, "op": "decode_attention", "kvkern": "0.1.0", "torch": torch.__version__,
            "triton": tuning._installed_triton(), "cuda": "12.8", "gpu": "NVIDIA H200", "device": device,
            "cc": "9.0", "sm_count": 132, "tuned_by": "autotune@test", "date": "2026-01-01T00:00:00Z"}
    if device == "cpu":
        meta.update(cuda=None, gpu="some cpu", cc=None, sm_count=None)
    meta.update(over)
    return meta


def make_entry(backend="cuda", **cfg):
    return {"backend": backend, "num_splits": 1, "block_n": 64, "num_warps": 4, "num_stages": 2, "us": 1.5, **cfg}


def file_path(root: Path, device=DEV, static=STATIC) -> Path:
    return root / "decode_attention" / tuning.config_file_name(SPEC, device, static)


def write(root: Path, entries=None, device=DEV, static=STATIC, **meta_over) -> Path:
    entries = entries or {(1, 1024): make_entry()}
    return tuning.write_config_file(file_path(root, device, static), make_meta(device, **meta_over), SPEC, entries)


def valid_doc(device=DEV) -> dict:
    return {"_meta": make_meta(device), "dims": ["batch_heads", "capacity"],
            "entries": {"1,1024": make_entry("cpu" if device == "cpu" else "cuda")}}


def look(bh=1, cap=1024, device=DEV, static=STATIC):
    return tuning.lookup(SPEC, device, static, {"batch_heads": bh, "capacity": cap})


def tuning_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, tuning.TuningWarning)]


# ---------------------------------------------------------------------------
# Name grammar
# ---------------------------------------------------------------------------

def test_name_is_built_in_spec_order():
    name = tuning.config_file_name(SPEC, DEV, {"group": 4, "dtype": "bf16", "head_dim": 128})
    assert name == "device=NVIDIA_H200,head_dim=128,dtype=bf16,group=4.json"


@pytest.mark.parametrize("device,static", [
    ("NVIDIA_H100_80GB_HBM3", {"head_dim": 64, "dtype": "fp16", "group": 1}),
    ("NVIDIA_A100-SXM4-80GB", {"head_dim": 256, "dtype": "fp32", "group": 8}),
    ("cpu", {"head_dim": 128, "dtype": "bf16", "group": 4}),
])
def test_name_round_trip(device, static):
    name = tuning.config_file_name(SPEC, device, static)
    assert " " not in name
    parsed_device, parsed = tuning.parse_config_file_name(name)
    assert (parsed_device, parsed) == (device, static)
    assert tuning.config_file_name(SPEC, parsed_device, parsed) == name
    assert tuning.parse_config_file_name(Path("/x/decode_attention") / name) == (device, static)


def test_name_round_trip_with_lists():
    spec = tuning.OpSpec("x_op", static=("block_shape", "n"), dims=("m",))
    name = tuning.config_file_name(spec, "cpu", {"n": 3, "block_shape": [128, 128]})
    assert name == "device=cpu,block_shape=[128,128],n=3.json"
    device, static = tuning.parse_config_file_name(name)
    assert static == {"block_shape": (128, 128), "n": 3}
    assert tuning.config_file_name(spec, device, static) == name


@pytest.mark.parametrize("device,static", [
    (DEV, {"head_dim": 128, "dtype": "bf16"}),                              # missing key
    (DEV, {**STATIC, "page": 16}),                                          # extra key
    (DEV, {**STATIC, "dtype": "b f16"}),                                    # space
    (DEV, {**STATIC, "dtype": "bf16,x"}),                                   # separator
    (DEV, {**STATIC, "dtype": "a=b"}),
    (DEV, {**STATIC, "group": True}),
    (DEV, {**STATIC, "group": None}),
    (DEV, {**STATIC, "group": 4.0}),
    ("NVIDIA H200", STATIC),                                                # raw, not normalized
    ("", STATIC),
])
def test_name_builder_rejects(device, static):
    with pytest.raises(ValueError):
        tuning.config_file_name(SPEC, device, static)


@pytest.mark.parametrize("name", [
    "head_dim=128,dtype=bf16,group=4.json",                  # no device
    "dtype=bf16,device=NVIDIA_H200,head_dim=128,group=4.json",
    "device=NVIDIA_H200,head_dim=128,dtype=bf16,group=4.json.bak",
    "device=NVIDIA_H200,head_dim=128,dtype=bf16,group=4",
    "device=NVIDIA_H200, head_dim=128,dtype=bf16,group=4.json",
    "device=NVIDIA_H200,,head_dim=128.json",
    "device=NVIDIA_H200,head_dim=128,.json",
    "device=NVIDIA_H200,head_dim=128,head_dim=64.json",
    "device=NVIDIA_H200,head_dim.json",
    "device=NVIDIA H200,head_dim=128,dtype=bf16,group=4.json",
    "device=NVIDIA_H200,block_shape=[128, 128].json",
])
def test_parse_rejects(name):
    with pytest.raises(ValueError):
        tuning.parse_config_file_name(name)


@pytest.mark.parametrize("name", [
    "device=NVIDIA_H200,dtype=bf16,head_dim=128,group=4.json",        # key order
    "device=NVIDIA_H200,head_dim=0128,dtype=bf16,group=4.json",       # leading zero
    "device=NVIDIA_H200,head_dim=128,dtype=bf16,group=-0.json",
    "device=NVIDIA_H200,head_dim=128,dtype=bf16.json",                # missing key
    "device=NVIDIA_H200,head_dim=128,dtype=bf16,group=4,page=16.json",  # extra key
    "device=NVIDIA_H200,head_dim=128,dtype=bf16,group=4.JSON",
    "device=NVIDIA_H100,head_dim=128,dtype=bf16,group=4.json",        # not a known device
    "device=NVIDIA_H100_SXM,head_dim=128,dtype=bf16,group=4.json",    # an alias, not the canonical name
    "device=NVIDIA H200,head_dim=128,dtype=bf16,group=4.json",
])
def test_validate_rejects_names_the_builder_would_not_produce(tmp_path, name):
    path = tmp_path / "decode_attention" / name
    path.parent.mkdir(parents=True)
    doc = valid_doc()
    try:
        doc["_meta"]["device"] = tuning.parse_config_file_name(name)[0]
    except ValueError:
        pass
    path.write_text(json.dumps(doc))
    problems = tuning.validate_config_file(path)
    assert problems and any("file name" in p for p in problems), problems


def test_validate_accepts_a_good_file_and_wants_the_op_directory(tmp_path):
    path = write(tmp_path)
    assert tuning.validate_config_file(path) == []
    moved = tmp_path / "decode_attention_v2" / path.name
    moved.parent.mkdir()
    shutil.copy(path, moved)
    assert any("op" in p for p in tuning.validate_config_file(moved))
    assert any("directory" in p for p in tuning.validate_config_file(moved, SPEC))


# ---------------------------------------------------------------------------
# Device names
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw,expected", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA_H100_80GB_HBM3"),
    ("NVIDIA H100 HBM3", "NVIDIA_H100_80GB_HBM3"),
    ("NVIDIA_H100_SXM", "NVIDIA_H100_80GB_HBM3"),
    ("NVIDIA H100 SXM5 80GB", "NVIDIA_H100_80GB_HBM3"),
    ("NVIDIA H100 PCIe", "NVIDIA_H100_PCIe"),
    ("NVIDIA H100 NVL", "NVIDIA_H100_NVL"),
    ("NVIDIA H200", "NVIDIA_H200"),
    ("NVIDIA H200 NVL", "NVIDIA_H200"),
    ("NVIDIA H200 141GB HBM3e", "NVIDIA_H200"),
    ("NVIDIA GH200 480GB", "NVIDIA_GH200_480GB"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA_A100-SXM4-80GB"),
    ("  NVIDIA  L40S ", "NVIDIA_L40S"),
    ("AMD Instinct MI300X (gfx942)", "AMD_Instinct_MI300X__gfx942_"),
])
def test_device_name_normalization(raw, expected):
    name = tuning.normalize_device_name(raw)
    assert name == expected
    assert tuning.normalize_device_name(name) == name  # idempotent
    tuning.config_file_name(SPEC, name, STATIC)  # always fits the grammar


def test_known_devices_are_canonical():
    for name in tuning.KNOWN_DEVICES:
        assert tuning.normalize_device_name(name) == name
    for _, target in tuning.DEVICE_ALIASES:
        assert target in tuning.KNOWN_DEVICES


def test_device_name_cpu_and_cuda(monkeypatch):
    assert tuning.device_name(torch.device("cpu")) == "cpu"
    assert tuning.device_name("cpu") == "cpu"
    assert tuning.device_info("cpu")["device"] == "cpu"
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    tuning._cuda_device_info.cache_clear()
    try:
        assert tuning.device_name(torch.device("cuda", 0)) == "NVIDIA_H100_80GB_HBM3"
        assert tuning.device_info(torch.device("cuda", 0)) == {
            "gpu": "NVIDIA H100 80GB HBM3", "device": "NVIDIA_H100_80GB_HBM3", "cc": "9.0", "sm_count": 132}
        assert tuning._RUNNING_CC["NVIDIA_H100_80GB_HBM3"] == "9.0"  # what lookups compare _meta.cc with
    finally:
        tuning._cuda_device_info.cache_clear()


# ---------------------------------------------------------------------------
# Bucketing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("v,expected", [
    (4, 4), (16, 16), (1, 1),       # exact
    (3, 4), (7, 4), (12, 16),       # nearest on a log2 scale
    (2, 4), (8, 16),                # ties (geometric midpoints) go to the larger bucket
    (0, 1), (-5, 1),                # below the grid
    (100_000, 16),                  # above the grid
])
def test_nearest_value(v, expected):
    assert tuning.nearest_value([1, 4, 16], v) == expected


def test_nearest_value_ties_are_exact_and_go_up():
    assert tuning.nearest_value([2, 8], 4) == 8
    assert tuning.nearest_value([3, 12], 6) == 12
    assert tuning.nearest_value([1024, 4096], 2048) == 4096
    assert tuning.nearest_value([1024, 4096], 2047) == 1024


def test_nearest_bucket_full_and_partial_grid():
    full = [(b, c) for b in (1, 8, 64) for c in (1024, 4096)]
    assert tuning.nearest_bucket(full, (8, 4096)) == (8, 4096)
    assert tuning.nearest_bucket(full, (5, 1500)) == (8, 1024)
    assert tuning.nearest_bucket(full, (1000, 1)) == (64, 1024)
    # A missing corner: the first dim decides first, then the nearest remaining capacity.
    partial = [(1, 1024), (1, 65536), (64, 1024)]
    assert tuning.nearest_bucket(partial, (64, 65536)) == (64, 1024)
    assert tuning.nearest_bucket(partial, (2, 65536)) == (1, 65536)


def test_lookup_buckets(monkeypatch, tmp_path):
    grid = {(b, c): make_entry(num_splits=10 * i + j + 1)
            for i, b in enumerate((1, 8, 64)) for j, c in enumerate((1024, 4096))}
    write(tmp_path, grid)
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))

    def splits(bh, cap):
        return look(bh, cap)["num_splits"]

    assert splits(8, 4096) == grid[(8, 4096)]["num_splits"]     # exact
    assert splits(5, 1500) == grid[(8, 1024)]["num_splits"]     # nearest per dim
    assert splits(2, 2048) == grid[(1, 4096)]["num_splits"]     # 2048 ties between 1024 and 4096 -> 4096
    assert splits(0, 1) == grid[(1, 1024)]["num_splits"]        # below the grid
    assert splits(10**6, 10**9) == grid[(64, 4096)]["num_splits"]  # above it


def test_lookup_returns_a_copy_and_rejects_wrong_keys(monkeypatch, tmp_path):
    write(tmp_path)
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    entry = look()
    entry["num_splits"] = 999
    assert look()["num_splits"] == 1
    with pytest.raises(ValueError):
        tuning.lookup(SPEC, DEV, STATIC, {"batch_heads": 1})
    with pytest.raises(ValueError):
        tuning.lookup(SPEC, DEV, {"head_dim": 128}, {"batch_heads": 1, "capacity": 1})


# ---------------------------------------------------------------------------
# Lookup order and fallbacks
# ---------------------------------------------------------------------------

def test_lookup_order(monkeypatch, tmp_path):
    user, packaged, source = tmp_path / "user", tmp_path / "packaged", tmp_path / "source"
    write(user, {(1, 1024): make_entry(num_splits=1)})
    write(packaged, {(1, 1024): make_entry(num_splits=2)})
    write(source, {(1, 1024): make_entry(num_splits=3)})
    monkeypatch.setattr(tuning, "_PACKAGED_DIR", packaged)
    monkeypatch.setattr(tuning, "_SOURCE_DIR", source)

    assert tuning.search_dirs() == [packaged]
    assert look()["num_splits"] == 2  # the packaged database beats the source tree's

    monkeypatch.setenv(tuning.ENV_DIR, str(user))
    assert tuning.search_dirs() == [user, packaged]
    assert look()["num_splits"] == 1  # the user's own tuning beats the packaged one

    monkeypatch.setattr(tuning, "_PACKAGED_DIR", tmp_path / "not_installed")
    tuning.clear_caches()
    assert tuning.search_dirs() == [user, source]  # editable install: the source tree
    monkeypatch.delenv(tuning.ENV_DIR)
    assert look()["num_splits"] == 3

    # A user dir without this file falls through to the next directory.
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path / "empty_user"))
    (tmp_path / "empty_user").mkdir()
    assert look()["num_splits"] == 3


def test_missing_file_warns_once(monkeypatch, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for bh in (1, 2, 3, 1, 1):
            assert look(bh=bh) is None
    messages = tuning_warnings(record)
    assert len(messages) == 1, messages
    assert "no tuned decode_attention config" in messages[0] and "python -m autotune" in messages[0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert look(static={**STATIC, "group": 8}) is None  # another static key: its own warning
        assert look(static={**STATIC, "group": 8}) is None
    assert len(tuning_warnings(record)) == 1


def test_env_dir_that_is_not_a_directory_warns(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path / "nope"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert look() is None
        assert look() is None
    messages = tuning_warnings(record)
    assert len(messages) == 2 and "not a directory" in messages[0] and "no tuned" in messages[1], messages


def _raw(doc) -> str:
    return json.dumps(doc)


def _doc_with(**changes):
    doc = valid_doc()
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = doc
        for p in parents:
            target = target[p]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return _raw(doc)


_DELETE = object()

BAD_FILES = {
    "not json": "{not json",
    "truncated": _raw(valid_doc())[:-10],
    "not utf-8": b"\xff\xfe{}",
    "empty": "",
    "a list": "[]",
    "nan": _raw(valid_doc()).replace('"us": 1.5', '"us": NaN'),
    "repeated keys": _raw(valid_doc()).replace('"entries": {', '"entries": {"1,1024": {}, '),
    "schema 2": _doc_with(_meta__schema=2),
    "schema as string": _doc_with(_meta__schema="1"),
    "no meta": _doc_with(_meta=_DELETE),
    "meta missing cc": _doc_with(_meta__cc=_DELETE),
    "meta device mismatch": _doc_with(_meta__device="NVIDIA_H100_80GB_HBM3"),
    "meta op mismatch": _doc_with(_meta__op="quantize_kv"),
    "gpu file without cc": _doc_with(_meta__cc=None),
    "bad cc": _doc_with(_meta__cc="sm90"),
    "sm_count string": _doc_with(_meta__sm_count="132"),
    "dims wrong": _doc_with(dims=["capacity", "batch_heads"]),
    "no entries": _doc_with(entries={}),
    "entries a list": _doc_with(entries=[]),
    "unknown top key": _doc_with(extra=1),
    "num_splits string": _doc_with(entries={"1,1024": make_entry(num_splits="4")}),
    "num_splits negative": _doc_with(entries={"1,1024": make_entry(num_splits=-1)}),
    "num_splits float": _doc_with(entries={"1,1024": make_entry(num_splits=1.5)}),
    "num_splits bool": _doc_with(entries={"1,1024": make_entry(num_splits=True)}),
    "missing config key": _doc_with(entries={"1,1024": {k: v for k, v in make_entry().items() if k != "block_n"}}),
    "unknown entry key": _doc_with(entries={"1,1024": make_entry(tile=128)}),
    "us negative": _doc_with(entries={"1,1024": make_entry(us=-1.0)}),
    "us string": _doc_with(entries={"1,1024": make_entry(us="1.0")}),
    "unknown backend": _doc_with(entries={"1,1024": make_entry("cudnn")}),
    # configs the entry's own backend would refuse on every call (OpSpec.check_config)
    "num_splits past the bound": _doc_with(entries={"1,1024": make_entry(num_splits=2**31)}),
    "cuda variant not compiled": _doc_with(entries={"1,1024": make_entry("cuda", block_n=16, num_warps=8)}),
    "cuda num_stages": _doc_with(entries={"1,1024": make_entry("cuda", num_stages=5)}),
    "triton block_n not a power of two": _doc_with(entries={"1,1024": make_entry("triton", block_n=48)}),
    "triton num_warps": _doc_with(entries={"1,1024": make_entry("triton", num_warps=3)}),
    "cpu backend in a gpu file": _doc_with(entries={"1,1024": make_entry("cpu")}),
    "key not ascending": _doc_with(entries={"8,1024": make_entry(), "1,1024": make_entry()}),
    "key with zero": _doc_with(entries={"0,1024": make_entry()}),
    "key with three dims": _doc_with(entries={"1,1024,3": make_entry()}),
    "key with space": _doc_with(entries={"1, 1024": make_entry()}),
    "key not ints": _doc_with(entries={"one,1024": make_entry()}),
}


@pytest.mark.parametrize("content", list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_bad_file_is_ignored_with_one_warning(monkeypatch, tmp_path, content):
    path = file_path(tmp_path / "user")
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path / "user"))
    assert tuning.validate_config_file(path), "validate_config_file should report problems"
    with pytest.raises(tuning.ConfigFileError):
        tuning.load_config_file(path)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for bh in (1, 7, 1):
            assert look(bh=bh) is None
    ignored = [m for m in tuning_warnings(record) if "ignoring" in m]
    assert len(ignored) == 1 and str(path) in ignored[0], tuning_warnings(record)

    # A good packaged file behind the bad user file is used.
    packaged = tmp_path / "packaged"
    write(packaged, {(1, 1024): make_entry(num_splits=7)})
    monkeypatch.setattr(tuning, "_PACKAGED_DIR", packaged)
    tuning.clear_caches()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert look()["num_splits"] == 7
        assert look()["num_splits"] == 7
    assert len(tuning_warnings(record)) == 1


def test_cc_mismatch_is_used_with_one_warning(monkeypatch, tmp_path):
    write(tmp_path, cc="8.0")
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    monkeypatch.setitem(tuning._RUNNING_CC, DEV, "9.0")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for bh in (1, 2, 100):
            assert look(bh=bh)["backend"] == "cuda"
    messages = tuning_warnings(record)
    assert len(messages) == 1 and "compute capability 8.0" in messages[0], messages


def test_triton_mismatch_is_used_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "_installed_triton", lambda: "3.9.0")
    write(tmp_path, {(1, 1024): make_entry("triton"), (8, 1024): make_entry("cuda")}, triton="3.1.2")
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert look(bh=1)["backend"] == "triton"
        assert look(bh=8)["backend"] == "cuda"
    messages = tuning_warnings(record)
    assert len(messages) == 1 and "triton 3.1.2" in messages[0], messages


def test_matching_versions_and_non_triton_files_do_not_warn(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "_installed_triton", lambda: "3.9.1")
    write(tmp_path, static={**STATIC, "group": 1}, triton="3.9.0", cc="9.0")  # same major.minor
    write(tmp_path, static={**STATIC, "group": 2}, triton="3.1.0")  # only cuda entries: triton irrelevant
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    monkeypatch.setitem(tuning._RUNNING_CC, DEV, "9.0")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert look(static={**STATIC, "group": 1}) is not None
        assert look(static={**STATIC, "group": 2}) is not None
    assert tuning_warnings(record) == []


def test_load_is_cached(tmp_path):
    path = write(tmp_path)
    assert tuning.load_config_file(path) is tuning.load_config_file(path)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def test_atomic_write(tmp_path):
    entries = {(8, 4096): make_entry(num_splits=2), (1, 1024): make_entry("triton", us=2.25)}
    path = write(tmp_path, entries)
    data = json.loads(path.read_text())
    assert list(data["entries"]) == ["1,1024", "8,4096"]  # sorted
    assert data["entries"]["1,1024"] == make_entry("triton", us=2.25)
    assert data["_meta"] == make_meta()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    assert (path.stat().st_mode & 0o777) == 0o644
    assert tuning.validate_config_file(path) == []


def test_invalid_write_leaves_nothing(tmp_path):
    path = file_path(tmp_path)
    with pytest.raises(ValueError):
        tuning.write_config_file(path, make_meta(), SPEC, {(1, 1024): make_entry("cudnn")})
    with pytest.raises(ValueError):
        tuning.write_config_file(path, make_meta(device="NVIDIA_H100_80GB_HBM3"), SPEC, {(1, 1024): make_entry()})
    with pytest.raises(ValueError):
        tuning.write_config_file(tmp_path / "elsewhere" / path.name, make_meta(), SPEC, {(1, 1024): make_entry()})
    assert not path.exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_concurrent_reader_never_sees_a_partial_file(tmp_path):
    versions = [{(b, 1024): make_entry(num_splits=k) for b in range(1, 200)} for k in (1, 2)]
    path = write(tmp_path, versions[0])
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(json.loads(path.read_text())["entries"]["1,1024"]["num_splits"])
            except Exception as err:  # a partial or missing file
                errors.append(repr(err))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(40):
            write(tmp_path, versions[i % 2])
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert seen <= {1, 2}
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*"))


# ---------------------------------------------------------------------------
# The checked-in database and its schema
# ---------------------------------------------------------------------------

def test_every_checked_in_config_validates():
    root = REPO / "autotune" / "configs"
    specs = tuning.known_specs()
    problems = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_dir():
            if len(rel.parts) != 1 or rel.name not in specs:
                problems.append(f"{rel}: unexpected directory (expected <op>/ for a known op)")
        elif path.name == ".gitkeep":
            continue
        elif path.suffix != ".json" or len(rel.parts) != 2:
            problems.append(f"{rel}: unexpected file")
        else:
            problems += [f"{rel}: {p}" for p in tuning.validate_config_file(path)]
    assert problems == []


def test_schema_json_agrees_with_the_checks():
    schema = json.loads((REPO / "autotune" / "schema.json").read_text())
    meta = schema["properties"]["_meta"]
    assert meta["required"] == list(tuning.META_KEYS)
    assert meta["properties"]["schema"]["const"] == tuning.SCHEMA_VERSION
    entry = next(iter(schema["properties"]["entries"]["patternProperties"].values()))
    assert entry["properties"]["backend"]["enum"] == list(tuning.BACKENDS)
    assert tuning._schema_problems(valid_doc(), schema) == []
    assert tuning._schema_problems(valid_doc("cpu"), schema) == []
    for name in ("schema 2", "us string", "num_splits negative", "key with zero", "unknown top key",
                 "unknown backend", "meta missing cc", "no entries"):
        assert tuning._schema_problems(json.loads(BAD_FILES[name]), schema), name


def test_check_command(tmp_path, capsys):
    from autotune import tune

    good = write(tmp_path)
    assert tune.main(["--check", str(tmp_path)]) == 0
    bad = good.with_name(good.name.replace("group=4", "group=04"))
    shutil.copy(good, bad)
    assert tune.main(["--check", str(tmp_path)]) == 1
    assert "group=04" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# The tuner
# ---------------------------------------------------------------------------

def test_tuner_end_to_end_on_cpu(monkeypatch, tmp_path, capsys):
    from autotune import tune

    out = tmp_path / "db"
    rc = tune.main(["--op", "decode_attention", "--device", "cpu", "--dtype", "fp32", "bf16", "--head-dim", "64",
                    "--group", "2", "--batch-heads", "1", "4", "--capacity", "64", "256",
                    "--warmup", "1", "--iters", "2", "--out-dir", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "] 8/8 " in captured.err  # the progress bar: 2 files x 4 buckets
    files = sorted((out / "decode_attention").iterdir())
    assert [f.name for f in files] == ["device=cpu,head_dim=64,dtype=bf16,group=2.json",
                                       "device=cpu,head_dim=64,dtype=fp32,group=2.json"]
    for f in files:
        assert tuning.validate_config_file(f) == []
    data = json.loads(files[1].read_text())
    assert list(data["entries"]) == ["1,64", "1,256", "4,64", "4,256"]
    meta = data["_meta"]
    assert meta["device"] == "cpu" and meta["op"] == "decode_attention" and meta["tuned_by"].startswith("autotune@")
    assert meta["torch"] == torch.__version__ and meta["kvkern"]

    monkeypatch.setenv(tuning.ENV_DIR, str(out))
    static = {"head_dim": 64, "dtype": "fp32", "group": 2}
    got = tuning.lookup(SPEC, "cpu", static, {"batch_heads": 4, "capacity": 200})
    assert got == data["entries"]["4,256"] and got["backend"] == "cpu"

    # The winner's config runs through the op and matches the reference on fresh inputs.
    q, k, v, lengths, _ = make_decode_inputs(2, 4, 2, 256, 64, torch.float32, "cpu")
    cfg = [got[key] for key in ("num_splits", "block_n", "num_warps", "num_stages")]
    out, lse = torch.ops.kvkern.decode_attention(q, k, v, lengths, None, None, *cfg)
    ref_out, ref_lse = reference.decode_attention(q, k, v, lengths)
    assert_verbose_allclose(out, ref_out, *TOLERANCES[torch.float32], what="out")
    assert_verbose_allclose(lse, ref_lse, *TOLERANCES[torch.float32], what="lse")


def test_tuner_skips_failures_and_rejects_wrong_winners(monkeypatch, tmp_path):
    from autotune import tune

    spec = tuning.OpSpec("fake_op", static=("n",), dims=("size",))
    tuning.register_spec(spec)

    def run(backend, x, cfg):
        s = cfg["num_splits"]
        if s == 1:
            raise RuntimeError("OutOfResources: shared memory")
        if s == 2:
            return (torch.zeros_like(x),)  # fastest, but wrong
        time.sleep(0.002 * (s - 2))
        return (x * 2,)

    fake = tune.OpTuner(
        spec=spec,
        static_args=(tune.StaticArg("n", int, None, (1,)),),
        grids={"tiny": {"size": (4, 16)}},
        backends=lambda device_type: (["cpu"], []),
        candidates=lambda backend, static, dims: [{"num_splits": s} for s in (1, 2, 3, 4)],
        make_inputs=lambda static, dims, device, gen: torch.randn(dims["size"], generator=gen) + 10,
        input_bytes=lambda static, dims: dims["size"] * 4,
        run=run,
        reference=lambda x: (x * 2,),
        tolerance=lambda static: (1e-6, 1e-6),
    )
    monkeypatch.setitem(tune.OPS, "fake_op", fake)
    result = tune.tune("fake_op", device="cpu", statics=[{"n": 3}], grid={"size": (4, 16)}, out_dir=tmp_path,
                       warmup=1, iters=2, progress=False)
    assert len(result.files) == 1
    table = tuning.load_config_file(result.files[0], spec)
    assert {k: e["num_splits"] for k, e in table.entries.items()} == {(4,): 3, (16,): 3}
    assert all(e["num_warps"] == 0 and e["backend"] == "cpu" for e in table.entries.values())
    assert any("OutOfResources" in n and "skipped" in n for n in result.notes)
    assert any("rejected" in n for n in result.notes)
    assert tuning.validate_config_file(result.files[0], spec) == []


# ---------------------------------------------------------------------------
# Packaging
# ---------------------------------------------------------------------------

def test_build_py_ships_the_configs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "kvkern", src / "kvkern",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_tuned", "_build_info.py"))
    shutil.copytree(REPO / "autotune" / "configs", src / "autotune" / "configs")
    configs = src / "autotune" / "configs"
    shipped = sorted(p.relative_to(configs) for p in configs.rglob("*.json"))
    if not shipped:  # the real database is still empty: ship a fixture
        shipped = [write(configs).relative_to(configs)]
    (configs / "decode_attention" / ".half-written.json.tmp").write_text("{")

    build = tmp_path / "build"
    env = {**os.environ, "KVKERN_CUDA": "0"}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)],
                          cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tuned = build / "kvkern" / "_tuned"
    assert sorted(p.relative_to(tuned) for p in tuned.rglob("*.json")) == shipped
    assert not list(tuned.rglob("*.tmp")) and not list(tuned.rglob(".*"))
    assert (build / "kvkern" / "tuning.py").exists()
    for rel in shipped:
        assert (tuned / rel).read_bytes() == (configs / rel).read_bytes()


@pytest.mark.parametrize("op, flags, name", [
    ("quant_decode_attention", ["--dtype", "fp32", "--head-dim", "64", "--group", "2", "--bits", "4",
                                "--quant-group", "32", "--capacity", "256", "512"],
     "device=cpu,head_dim=64,dtype=fp32,group=2,bits=4,quant_group=32.json"),
    ("fp8_decode_attention", ["--dtype", "fp32", "--head-dim", "64", "--group", "2", "--capacity", "256", "512"],
     "device=cpu,head_dim=64,dtype=fp32,group=2.json"),
    ("window_scores", ["--dtype", "fp32", "--head-dim", "64", "--group", "2", "--window", "4", "--capacity", "64",
                       "256"], "device=cpu,head_dim=64,dtype=fp32,group=2,window=4.json"),
    ("select_keep", ["--capacity", "64", "256"], "device=cpu.json"),
    ("quantize_kv_", ["--dtype", "fp16", "--head-dim", "64", "--bits", "2", "--quant-group", "32", "--centred", "1",
                      "--tokens", "100", "256"], "device=cpu,head_dim=64,dtype=fp16,bits=2,quant_group=32,centred=1.json"),
    ("append_quantized_kv_", ["--dtype", "bf16", "--head-dim", "64", "--bits", "4", "--quant-group", "32",
                              "--centred", "0", "--residual", "64"],
     "device=cpu,head_dim=64,dtype=bf16,bits=4,quant_group=32,centred=0,residual=64.json"),
    ("quantize_fp8_kv_", ["--dtype", "fp32", "--head-dim", "64", "--tokens", "33", "128"],
     "device=cpu,head_dim=64,dtype=fp32.json"),
    ("append_fp8_kv_", ["--dtype", "fp16", "--head-dim", "64"], "device=cpu,head_dim=64,dtype=fp16.json"),
])
def test_tuner_covers_the_newer_ops_on_cpu(tmp_path, capsys, op, flags, name):
    # Every op the tuner knows writes a valid file whose winners were checked against the reference.
    from autotune import tune

    out = tmp_path / "db"
    rc = tune.main(["--op", op, "--device", "cpu", "--batch-heads", "1", "2", "--warmup", "1", "--iters", "2",
                    "--out-dir", str(out), *flags])
    assert rc == 0, capsys.readouterr().err
    files = sorted((out / op).iterdir())
    assert [f.name for f in files] == [name]
    assert tuning.validate_config_file(files[0]) == []
    entries = json.loads(files[0].read_text())["entries"]
    n_buckets = 2 ** len(tune.OPS[op].spec.dims)  # two values of every dim
    assert len(entries) == n_buckets and all(e["backend"] == "cpu" for e in entries.values())


def test_writer_tuner_checks_the_restored_step_and_rejects_a_corrupt_backend(monkeypatch, tmp_path):
    # The append tuner times "reset lengths + append" repeatedly, then checks one append from the
    # restored cache against the reference: a backend that writes a wrong code is never the winner,
    # however fast, and the correct one passes although the timed repeats rewrote the ring.
    import dataclasses

    import kvkern
    from autotune import tune

    base = tune.OPS["append_quantized_kv_"]

    def corrupt_append(k_new, v_new, cache, backend):
        kvkern.append_quantized_kv_(k_new, v_new, cache, backend="cpu")
        cache.v_res.view(-1)[0] += 1  # value ring slots are all live once t >= R (every step here)

    def slow_append(k_new, v_new, cache, backend):
        time.sleep(0.003)
        kvkern.append_quantized_kv_(k_new, v_new, cache, backend="cpu")

    def run_with(fn):
        return lambda backend, x, cfg: tune._append_run(fn)(backend, x, cfg)

    runs = {"cpu": run_with(slow_append), "triton": run_with(corrupt_append)}
    checks = {}
    for name, fn in (("cpu", slow_append), ("triton", corrupt_append)):
        def check(backend, x, cfg, fn=fn):
            tune._restore(x)
            tune._append_run(fn)(backend, x, cfg)
            return (*tune._quant_live(x.cache, x.cache.lengths), x.cache.lengths.cpu())
        checks[name] = check
    fake = dataclasses.replace(base, backends=lambda device_type: (["cpu", "triton"], []),
                               run=lambda b, x, cfg: runs[b](b, x, cfg),
                               check_run=lambda b, x, cfg: checks[b](b, x, cfg))
    monkeypatch.setitem(tune.OPS, "append_quantized_kv_", fake)
    static = {"head_dim": 64, "dtype": "fp32", "bits": 4, "quant_group": 32, "centred": 1, "residual": 32}
    result = tune.tune("append_quantized_kv_", device="cpu", statics=[static], grid={"batch_heads": (2, 8)},
                       out_dir=tmp_path, warmup=1, iters=2, progress=False)
    table = tuning.load_config_file(result.files[0], base.spec)
    assert [e["backend"] for e in table.entries.values()] == ["cpu", "cpu"]
    assert sum("triton" in n and "rejected" in n for n in result.notes) == 2
