# SPDX-License-Identifier: Apache-2.0
"""Run-time side of the per-GPU tuning database.

The database is a set of checked-in JSON files, one per (op, device, static
shape key), written by ``python -m autotune`` (``autotune/tune.py``) and
shipped in the wheel as ``kvkern/_tuned``. ``autotune/README.md`` is the user
guide; this docstring is the contract.

File layout and name grammar
----------------------------
``<dir>/<op>/device=<DEVICE>,<k1>=<v1>,<k2>=<v2>.json``. ``<DEVICE>`` is
:func:`device_name` (the CUDA device name with spaces turned into ``_``, then
mapped through :data:`DEVICE_ALIASES`). The other keys are ``OpSpec.static``
in that fixed order. Values are ints (``128``), short strings (``bf16``) or
lists (``[1,2]``); no spaces anywhere. :func:`config_file_name` is the ONE
function that builds names, for the tuner and for the lookup alike; CI rejects
any file whose name it would not produce (:func:`validate_config_file`).

File content (``schema`` 1; ``autotune/schema.json`` spells it out)::

    {"_meta": {"schema": 1, "op": ..., "kvkern": ..., "torch": ..., "triton": ..., "cuda": ...,
               "gpu": <raw device name>, "device": <DEVICE>, "cc": "9.0", "sm_count": 132,
               "tuned_by": "autotune@<git sha>", "date": ...},
     "dims": ["batch_heads", "capacity"],
     "entries": {"1,256": {"backend": "cuda", "num_splits": 4, "block_n": 64,
                           "num_warps": 4, "num_stages": 2, "us": 3.1}, ...}}

Entry keys are the values of ``OpSpec.dims`` joined by ``,`` (positive ints, in
ascending order). Each entry names a ``backend`` ("cuda" or "triton" on a GPU,
"cpu" in a ``device=cpu`` file), the launch-config keys ``OpSpec.config``
(non-negative ints, 0 meaning "kernel heuristic"), and the measured time ``us``.

Lookup order
------------
:func:`search_dirs`: ``$KVKERN_TUNED_CONFIG_DIR`` (the user's own tuning) first,
then the packaged ``kvkern/_tuned``, or, when that does not exist (a source
checkout or editable install), the source tree's ``autotune/configs``. The first
directory holding a *valid* file for the name wins; an invalid file is skipped
with a warning and the search goes on.

Bucketing rule
--------------
The query's dims rarely hit a tuned bucket exactly. For each dim in
``OpSpec.dims`` order, among the entries still in play, keep those whose value
``k`` is *nearest to the query value* ``v`` *on a log2 scale* (smallest
``|log2 k - log2 v|``, with ``v`` clamped to at least 1); on a tie (``v`` at the
geometric midpoint of two buckets, e.g. ``v=2`` between 1 and 4) take the
*larger* bucket. Exactly one entry remains. On a full grid this is simply
"nearest bucket per dim"; outside the grid it clamps to the smallest or largest
bucket; when the tuner had to leave a corner of the grid out, the earlier dims
win. Ties go up because a config tuned for more work keeps enough parallelism
when given less, while the reverse tends to starve the GPU.

Warnings and failures
---------------------
A lookup never raises because of a file and never blocks: it returns an entry
(a fresh ``dict``) or ``None`` (the caller then uses its heuristic). Each case
below warns ONCE (:class:`TuningWarning`) per (op, device, static key) or per
file, however often it is looked up:

* no file for the key in any directory: ``None`` and a warning naming the
  directories searched and the command that tunes this GPU;
* a file that is unreadable, not JSON, of another schema version or with wrong
  keys, types or values: ignored (the search goes on) with a warning listing
  the problems;
* a valid file whose ``_meta.cc`` differs from the running device's compute
  capability, or whose ``_meta.triton`` major.minor differs from the installed
  Triton while some entry uses the "triton" backend: used anyway (configs
  affect speed, not correctness) with a warning.

After the first call for a given (op, device, static, dims) a lookup is one
cached dict hit. :func:`clear_caches` forgets parsed files and warnings (tests,
or after writing files in a long-lived process).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

__all__ = [
    "OpSpec", "TuningWarning", "ConfigFileError", "ConfigTable",
    "ENV_DIR", "SCHEMA_VERSION", "BACKENDS", "META_KEYS", "DEVICE_ALIASES", "KNOWN_DEVICES",
    "device_name", "device_info", "normalize_device_name",
    "config_file_name", "parse_config_file_name", "search_dirs",
    "load_config_file", "validate_config_file", "write_config_file",
    "lookup", "nearest_value", "nearest_bucket", "known_specs", "register_spec", "clear_caches",
    "on_clear_caches",
]

ENV_DIR = "KVKERN_TUNED_CONFIG_DIR"
SCHEMA_VERSION = 1
# Every backend a file may name; which ones a given file may use depends on its device.
BACKENDS = ("cpu", "cuda", "triton")
GPU_BACKENDS = ("cuda", "triton")
META_KEYS = ("schema", "op", "kvkern", "torch", "triton", "cuda", "gpu", "device", "cc", "sm_count",
             "tuned_by", "date")
# Meta keys that may be null (a CPU tuning has no CUDA, compute capability or SMs).
_NULLABLE_META = ("triton", "cuda", "cc", "sm_count")

# Packaged database (wheel) and the source tree's, used when the former is absent.
_PACKAGED_DIR = Path(__file__).resolve().parent / "_tuned"
_SOURCE_DIR = Path(__file__).resolve().parent.parent / "autotune" / "configs"
_SCHEMA_PATH = Path(__file__).resolve().parent.parent / "autotune" / "schema.json"


class TuningWarning(UserWarning):
    """The tuning database could not help: no file, a bad file, or a stale one."""


class ConfigFileError(ValueError):
    """A config file that cannot be used; ``problems`` lists why."""

    def __init__(self, path, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        super().__init__(f"{path}: " + "; ".join(self.problems))


@dataclass(frozen=True)
class OpSpec:
    """What the database stores for one op.

    static: names of the shape parameters that select a file (fixed order).
    dims: names of the dynamic dimensions bucketed inside a file.
    config: the launch-config keys every entry carries (non-negative ints).
    check_config: ``(backend, {key: value})`` raising ValueError (or TypeError) when that
        backend would refuse the config; a file with such an entry is invalid (skipped with a
        warning) instead of making every call that looks it up fail. None: no check.
    """

    op: str
    static: tuple[str, ...]
    dims: tuple[str, ...]
    config: tuple[str, ...] = ("num_splits", "block_n", "num_warps", "num_stages")
    check_config: Callable[[str, dict], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ConfigTable:
    """A parsed, validated config file."""

    path: str
    meta: dict
    dims: tuple[str, ...]
    entries: dict  # {(dim values...): entry dict}, ascending


# ---------------------------------------------------------------------------
# Device names
# ---------------------------------------------------------------------------

# Explicit family aliases, applied after spaces become "_" (first match wins).
# Only boards that share tuned configs are folded together; the tuner and the
# run time both go through normalize_device_name, so they always agree.
DEVICE_ALIASES: tuple[tuple[str, str], ...] = (
    # "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA H200 141GB HBM3e" (not GH200: a different board).
    (r"(?:^|_)H200(?:$|[_-])", "NVIDIA_H200"),
    # SXM5 boards report "NVIDIA H100 80GB HBM3"; other spellings of the same board.
    (r"(?:^|_)H100(?:_.*)?_(?:HBM3|SXM\w*)(?:$|_)", "NVIDIA_H100_80GB_HBM3"),
)
_ALIAS_PATTERNS = tuple((re.compile(p), name) for p, name in DEVICE_ALIASES)

# Canonical names CI accepts in file names. Add a row when tuning a new GPU
# (and an alias above if the GPU has several spellings).
KNOWN_DEVICES: tuple[str, ...] = (
    "cpu",
    "NVIDIA_H100_80GB_HBM3",
    "NVIDIA_H100_PCIe",
    "NVIDIA_H100_NVL",
    "NVIDIA_H200",
    "NVIDIA_GH200_480GB",
    "NVIDIA_B200",
    "NVIDIA_A100-SXM4-80GB",
    "NVIDIA_A100-SXM4-40GB",
    "NVIDIA_A100_80GB_PCIe",
    "NVIDIA_L40S",
)

_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_KEY_RE = re.compile(r"[a-z_][a-z0-9_]*")
_INT_RE = re.compile(r"-?(?:0|[1-9][0-9]*)")
_VERSION_RE = re.compile(r"(\d+)\.(\d+)")
_CC_RE = re.compile(r"\d+\.\d+")
_BUCKET_KEY_RE = re.compile(r"[1-9][0-9]*(?:,[1-9][0-9]*)*")

# Compute capability of every CUDA device resolved by device_name(), by normalized name.
_RUNNING_CC: dict[str, str] = {}


def normalize_device_name(raw: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"``: spaces to ``_``, then aliases.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` also become ``_``
    so that every device name fits the file-name grammar.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", re.sub(r"\s+", "_", raw.strip())) or "unknown"
    for pattern, canonical in _ALIAS_PATTERNS:
        if pattern.search(name):
            return canonical
    return name


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> dict:
    props = torch.cuda.get_device_properties(index)
    name = normalize_device_name(props.name)
    cc = f"{props.major}.{props.minor}"
    _RUNNING_CC[name] = cc
    return {"gpu": props.name, "device": name, "cc": cc, "sm_count": int(props.multi_processor_count)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None and device.index >= 0 else torch.cuda.current_device()


def device_name(device: torch.device | str | int | None = None) -> str:
    """The database's name for ``device``: ``"cpu"`` for CPU, else the normalized CUDA name.

    ``None`` means the current CUDA device (or CPU without one); an int is a CUDA index.
    Cached per device, so it costs a dict hit after the first call.
    """
    device = _as_device(device)
    if device.type != "cuda":
        return device.type
    return _cuda_device_info(_cuda_index(device))["device"]


def device_info(device: torch.device | str | int | None = None) -> dict:
    """``{"gpu": raw name, "device": device_name, "cc": "9.0"|None, "sm_count": int|None}``."""
    device = _as_device(device)
    if device.type != "cuda":
        raw = _cpu_model() if device.type == "cpu" else device.type
        return {"gpu": raw, "device": device.type, "cc": None, "sm_count": None}
    return dict(_cuda_device_info(_cuda_index(device)))


# ---------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------

def _format_scalar(key: str, value) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"static {key}: expected an int or a string, got {value!r}")
    if isinstance(value, str):
        if not _NAME_CHARS.fullmatch(value):
            raise ValueError(f"static {key}: {value!r} may hold only letters, digits, '.', '_' and '-'")
        return value
    try:
        return str(int(value.__index__()))
    except (AttributeError, TypeError):
        raise ValueError(f"static {key}: expected an int or a string, got {value!r}") from None


def _format_value(key: str, value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_scalar(key, v) for v in value) + "]"
    return _format_scalar(key, value)


def config_file_name(spec: OpSpec, device_name: str, static: Mapping[str, Any]) -> str:
    """The file name for ``(spec.op, device_name, static)``, e.g.
    ``device=NVIDIA_H200,head_dim=128,dtype=bf16,group=4.json``.

    Keys follow ``spec.static`` order whatever the order of ``static``. Raises
    ValueError for missing or extra keys and for values the grammar cannot hold.
    """
    if not isinstance(device_name, str) or not _NAME_CHARS.fullmatch(device_name):
        raise ValueError(f"device name {device_name!r}: expected letters, digits, '.', '_' and '-' only "
                         f"(use tuning.device_name())")
    missing = [k for k in spec.static if k not in static]
    extra = [k for k in static if k not in spec.static]
    if missing or extra:
        raise ValueError(f"{spec.op}: static keys must be {list(spec.static)}; "
                         f"missing {missing}, unexpected {extra}")
    parts = [f"device={device_name}"] + [f"{k}={_format_value(k, static[k])}" for k in spec.static]
    return ",".join(parts) + ".json"


_TOKEN_RE = re.compile(r"([a-z_][a-z0-9_]*)=(\[[A-Za-z0-9._-]*(?:,[A-Za-z0-9._-]+)*\]|[A-Za-z0-9._-]+)(,|$)")


def _parse_scalar(text: str):
    if _INT_RE.fullmatch(text):
        return int(text)
    if re.fullmatch(r"-?[0-9]+", text):
        raise ValueError(f"{text!r}: integers are written without leading zeros")
    return text


def parse_config_file_name(name: str | os.PathLike) -> tuple[str, dict]:
    """Inverse of :func:`config_file_name`: ``(device, {key: value})`` in file order.

    Accepts a bare name or a path. Ints come back as ints and lists as tuples.
    Raises ValueError if the name does not fit the grammar. A name that parses
    may still be one :func:`config_file_name` would spell differently (key
    order, leading zeros): :func:`validate_config_file` checks the round trip.
    """
    base = os.path.basename(os.fspath(name))
    if not base.endswith(".json"):
        raise ValueError(f"{base!r}: expected a .json file name")
    stem = base[: -len(".json")]
    pos, pairs = 0, []
    while pos < len(stem):
        m = _TOKEN_RE.match(stem, pos)
        if m is None:
            raise ValueError(f"{base!r}: expected key=value pairs joined by ',' at {stem[pos:]!r}")
        pairs.append((m.group(1), m.group(2)))
        pos = m.end()
        if m.group(3) == "," and pos == len(stem):
            raise ValueError(f"{base!r}: trailing ','")
    if not pairs or pairs[0][0] != "device":
        raise ValueError(f"{base!r}: expected the name to start with device=<DEVICE>")
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{base!r}: repeated keys")
    static = {}
    for key, text in pairs[1:]:
        if text.startswith("["):
            inner = text[1:-1]
            static[key] = tuple(_parse_scalar(t) for t in inner.split(",")) if inner else ()
        else:
            static[key] = _parse_scalar(text)
    return pairs[0][1], static


# ---------------------------------------------------------------------------
# Known ops
# ---------------------------------------------------------------------------

_EXTRA_SPECS: dict[str, OpSpec] = {}


def register_spec(spec: OpSpec) -> None:
    """Makes ``spec`` known to :func:`validate_config_file` (specs in kvkern.ops are found by themselves)."""
    _EXTRA_SPECS[spec.op] = spec


def known_specs() -> dict[str, OpSpec]:
    """``{op: OpSpec}`` for every OpSpec defined in ``kvkern.ops`` plus registered ones."""
    specs = dict(_EXTRA_SPECS)
    try:
        from . import ops  # lazily: ops imports this module
    except Exception:  # a broken build must not break validation of the rest
        return specs
    for value in vars(ops).values():
        if isinstance(value, OpSpec):
            specs.setdefault(value.op, value)
    return specs


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _name_problems(path: Path, spec: OpSpec, strict: bool) -> tuple[list[str], str | None]:
    """Problems with where the file lives and what it is called; also the device of the name."""
    problems = []
    if path.parent.name != spec.op:
        problems.append(f"file must live in a directory named after its op ({spec.op!r}), "
                        f"not {path.parent.name!r}")
    try:
        device, static = parse_config_file_name(path.name)
    except ValueError as err:
        return problems + [f"file name: {err}"], None
    try:
        expected = config_file_name(spec, device, static)
    except ValueError as err:
        return problems + [f"file name: {err}"], device
    if expected != path.name:
        problems.append(f"file name: {path.name!r} is not the name config_file_name builds for it "
                        f"({expected!r})")
    if strict and device not in KNOWN_DEVICES:
        problems.append(f"file name: unknown device {device!r}; known: {list(KNOWN_DEVICES)} "
                        f"(add new GPUs to kvkern.tuning.KNOWN_DEVICES)")
    return problems, device


def _meta_problems(meta, spec: OpSpec, device: str | None) -> list[str]:
    if not isinstance(meta, dict):
        return ["_meta: expected an object"]
    problems = []
    if meta.get("schema") != SCHEMA_VERSION or not _is_int(meta.get("schema")):
        problems.append(f"_meta.schema: expected {SCHEMA_VERSION}, got {meta.get('schema')!r}")
    for key in META_KEYS:
        if key not in meta:
            problems.append(f"_meta.{key}: missing")
    for key in META_KEYS:
        value = meta.get(key)
        if key not in meta or key == "schema":
            continue
        if value is None and key in _NULLABLE_META:
            continue
        if key == "sm_count":
            if not _is_int(value) or value < 0:
                problems.append(f"_meta.sm_count: expected a non-negative int or null, got {value!r}")
        elif not isinstance(value, str) or not value:
            problems.append(f"_meta.{key}: expected a non-empty string, got {value!r}")
        elif key == "cc" and not _CC_RE.fullmatch(value):
            problems.append(f"_meta.cc: expected 'major.minor', got {value!r}")
    if meta.get("op") != spec.op and isinstance(meta.get("op"), str):
        problems.append(f"_meta.op: {meta.get('op')!r} does not match the op {spec.op!r}")
    if device is not None and isinstance(meta.get("device"), str) and meta["device"] != device:
        problems.append(f"_meta.device: {meta['device']!r} does not match the file name's {device!r}")
    if device is not None and device != "cpu":
        for key in ("cc", "sm_count"):
            if key in meta and meta[key] is None:
                problems.append(f"_meta.{key}: required for a GPU file")
    return problems


def _entry_problems(key: str, entry, spec: OpSpec, device: str | None) -> list[str]:
    where = f"entries[{key!r}]"
    if not isinstance(entry, dict):
        return [f"{where}: expected an object"]
    problems = []
    allowed = ("cpu",) if device == "cpu" else GPU_BACKENDS if device is not None else BACKENDS
    if entry.get("backend") not in allowed:
        problems.append(f"{where}.backend: expected one of {list(allowed)}, got {entry.get('backend')!r}")
    for name in spec.config:
        value = entry.get(name)
        if not _is_int(value) or value < 0:
            problems.append(f"{where}.{name}: expected a non-negative int, got {value!r}")
    us = entry.get("us")
    if not _is_number(us) or us < 0:
        problems.append(f"{where}.us: expected a non-negative number, got {us!r}")
    extra = sorted(set(entry) - {"backend", "us", *spec.config})
    if extra:
        problems.append(f"{where}: unknown keys {extra}")
    if not problems and spec.check_config is not None:
        try:
            spec.check_config(entry["backend"], {name: entry[name] for name in spec.config})
        except (TypeError, ValueError) as err:
            problems.append(f"{where}: the {entry['backend']} backend refuses this config: {err}")
    return problems


def _content_problems(data, spec: OpSpec, device: str | None) -> list[str]:
    if not isinstance(data, dict):
        return ["expected a JSON object at the top level"]
    problems = []
    extra = sorted(set(data) - {"_meta", "dims", "entries"})
    if extra:
        problems.append(f"unknown top-level keys {extra}")
    if "_meta" not in data:
        problems.append("_meta: missing")
    else:
        problems += _meta_problems(data["_meta"], spec, device)
        if not (isinstance(data["_meta"], dict) and data["_meta"].get("schema") == SCHEMA_VERSION):
            return problems  # another schema: the rest would only add noise
    if data.get("dims") != list(spec.dims):
        problems.append(f"dims: expected {list(spec.dims)}, got {data.get('dims')!r}")
    entries = data.get("entries")
    if not isinstance(entries, dict) or not entries:
        problems.append("entries: expected a non-empty object")
        return problems
    previous = None
    for key, entry in entries.items():
        if not _BUCKET_KEY_RE.fullmatch(key) or key.count(",") != len(spec.dims) - 1:
            problems.append(f"entries: key {key!r} is not {len(spec.dims)} positive ints joined by ','"
                            f" ({','.join(spec.dims)})")
            continue
        point = tuple(int(v) for v in key.split(","))
        if previous is not None and point <= previous:
            problems.append(f"entries: keys must be unique and ascending; {key!r} follows "
                            f"{','.join(map(str, previous))!r}")
        previous = point
        problems += _entry_problems(key, entry, spec, device)
    return problems


# A JSON-Schema subset, enough for autotune/schema.json (no new dependency).
_JSON_TYPES = {
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "string": lambda x: isinstance(x, str),
    "integer": _is_int,
    "number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
    "boolean": lambda x: isinstance(x, bool),
    "null": lambda x: x is None,
}


def _schema_problems(value, schema: dict, where: str = "$") -> list[str]:
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_JSON_TYPES[t](value) for t in types):
            return [f"{where}: expected type {'/'.join(types)}, got {value!r}"]
    problems = []
    if "const" in schema and value != schema["const"]:
        problems.append(f"{where}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: expected one of {schema['enum']}, got {value!r}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
        if len(value) < schema.get("minLength", 0):
            problems.append(f"{where}: shorter than {schema['minLength']}")
    if _JSON_TYPES["number"](value) and "minimum" in schema and value < schema["minimum"]:
        problems.append(f"{where}: {value!r} is below {schema['minimum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            problems.append(f"{where}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                problems += _schema_problems(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        if len(value) < schema.get("minProperties", 0):
            problems.append(f"{where}: fewer than {schema['minProperties']} properties")
        for key in schema.get("required", ()):
            if key not in value:
                problems.append(f"{where}: missing {key!r}")
        props, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
        additional = schema.get("additionalProperties", True)
        for key, item in value.items():
            sub = f"{where}.{key}"
            matched = False
            if key in props:
                matched = True
                problems += _schema_problems(item, props[key], sub)
            for pattern, sub_schema in patterns.items():
                if re.search(pattern, key):
                    matched = True
                    problems += _schema_problems(item, sub_schema, sub)
            if not matched:
                if additional is False:
                    problems.append(f"{where}: unexpected key {key!r}")
                elif isinstance(additional, dict):
                    problems += _schema_problems(item, additional, sub)
    return problems


def _read_json(path: Path):
    """(data, problems): strict JSON (no NaN, no repeated keys), UTF-8."""
    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"repeated keys {sorted({k for k in keys if keys.count(k) > 1})}")
        return dict(pairs)

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, [f"unreadable: {err}"]
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_repeats, parse_constant=no_constants), []
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        return None, [f"not valid JSON: {err}"]


def _spec_for(path: Path, spec: OpSpec | None) -> tuple[OpSpec | None, list[str]]:
    if spec is not None:
        return spec, []
    specs = known_specs()
    op = path.parent.name
    if op in specs:
        return specs[op], []
    return None, [f"unknown op directory {op!r}; known ops: {sorted(specs)}"]


def validate_config_file(path: str | os.PathLike, spec: OpSpec | None = None) -> list[str]:
    """Every problem with a config file, for CI; ``[]`` means the file is good.

    Checks: the name grammar (the name must be what :func:`config_file_name`
    builds from it) and that it lives in ``<op>/``; a known device
    (:data:`KNOWN_DEVICES`); the content against ``autotune/schema.json`` (when
    the source tree is present) and against the op's ``OpSpec``: schema version,
    ``_meta`` fields, dims, parsable ascending bucket keys, known backends for
    the device, non-negative int configs that the entry's backend accepts
    (``OpSpec.check_config``). ``spec`` defaults to the OpSpec of the
    op named by the parent directory.
    """
    path = Path(path)
    spec, problems = _spec_for(path, spec)
    if spec is None:
        return problems
    problems, device = _name_problems(path, spec, strict=True)
    data, read_problems = _read_json(path)
    if read_problems:
        return problems + read_problems
    if _SCHEMA_PATH.is_file():
        try:
            schema = json.loads(_SCHEMA_PATH.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            problems.append(f"autotune/schema.json unusable: {err}")
        else:
            problems += [f"schema.json: {p}" for p in _schema_problems(data, schema)]
    return problems + _content_problems(data, spec, device)


@functools.lru_cache(maxsize=256)
def _load_cached(path: str, mtime_ns: int, size: int, spec: OpSpec | None):
    p = Path(path)
    spec, problems = _spec_for(p, spec)
    if spec is None:
        return None, problems
    problems, device = _name_problems(p, spec, strict=False)
    data, read_problems = _read_json(p)
    problems += read_problems
    if data is not None:
        problems += _content_problems(data, spec, device)
    if problems:
        return None, problems
    entries = {tuple(int(v) for v in k.split(",")): v for k, v in data["entries"].items()}
    return ConfigTable(path, data["_meta"], tuple(data["dims"]), entries), []


def load_config_file(path: str | os.PathLike, spec: OpSpec | None = None) -> ConfigTable:
    """Parses and validates one config file (cached by path, mtime and size).

    Unlike :func:`validate_config_file` it accepts device names missing from
    :data:`KNOWN_DEVICES` (a user's own tuning of a new GPU). Raises
    :class:`ConfigFileError` listing the problems, or OSError if it cannot stat.
    """
    path = Path(path)
    st = path.stat()
    table, problems = _load_cached(str(path), st.st_mtime_ns, st.st_size, spec)
    if table is None:
        raise ConfigFileError(path, problems)
    return table


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def _entry_key(key, spec: OpSpec) -> tuple[int, ...]:
    point = tuple(int(v) for v in key.split(",")) if isinstance(key, str) else tuple(int(v) for v in key)
    if len(point) != len(spec.dims):
        raise ValueError(f"entry key {key!r}: expected {len(spec.dims)} values ({', '.join(spec.dims)})")
    return point


def _format_file(data: dict) -> str:
    # One entry per line: small diffs when a GPU is retuned, easy review.
    meta = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in data["_meta"].items())
    entries = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in data["entries"].items())
    return ('{\n  "_meta": {\n' + meta + '\n  },\n'
            f'  "dims": {json.dumps(data["dims"])},\n'
            '  "entries": {\n' + entries + "\n  }\n}\n")


def write_config_file(path: str | os.PathLike, meta: Mapping[str, Any], spec: OpSpec,
                      entries: Mapping[Any, Mapping[str, Any]]) -> Path:
    """Writes a config file atomically (temp file in the same directory, then os.replace).

    Args:
        path: ``<dir>/<spec.op>/<config_file_name(...)>``; parent directories are created.
        meta: the ``_meta`` fields (:data:`META_KEYS`; ``schema`` and ``op`` are filled in).
        spec: the op's OpSpec.
        entries: ``{(dim values...) or "a,b": {"backend": ..., <spec.config keys>: int, "us": float}}``,
            in any order (written ascending, keys in a fixed order).

    Raises ValueError (nothing is written) if the result would not pass
    :func:`load_config_file`. Readers never see a partial file.
    """
    path = Path(path)
    meta = {"schema": SCHEMA_VERSION, "op": spec.op, **dict(meta)}
    meta = {**{k: meta[k] for k in META_KEYS if k in meta}, **{k: v for k, v in meta.items() if k not in META_KEYS}}
    rows = []
    for key, entry in entries.items():
        entry = dict(entry)
        ordered = {"backend": entry.pop("backend", None)}
        ordered.update({k: entry.pop(k, None) for k in spec.config})
        ordered["us"] = entry.pop("us", None)
        if isinstance(ordered["us"], float):
            ordered["us"] = round(ordered["us"], 3)
        ordered.update(entry)
        rows.append((_entry_key(key, spec), ordered))
    rows.sort(key=lambda r: r[0])
    data = {"_meta": meta, "dims": list(spec.dims),
            "entries": {",".join(map(str, k)): v for k, v in rows}}
    problems, device = _name_problems(path, spec, strict=False)
    problems += _content_problems(data, spec, device)
    if problems:
        raise ValueError(f"write_config_file({path}): " + "; ".join(problems))
    text = _format_file(data)
    assert json.loads(text) == data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the database is meant to be read by all
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# ---------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------

def search_dirs() -> list[Path]:
    """Where lookups search, in order: ``$KVKERN_TUNED_CONFIG_DIR``, then the packaged
    ``kvkern/_tuned`` if it exists, else the source tree's ``autotune/configs``.

    Each holds ``<op>/<config_file_name>`` files. The environment variable is
    listed even when it names no directory (the lookup warns about that).
    """
    dirs = []
    env = os.environ.get(ENV_DIR)
    if env:
        dirs.append(Path(env).expanduser())
    if _PACKAGED_DIR.is_dir():
        dirs.append(_PACKAGED_DIR)
    elif _SOURCE_DIR.is_dir():
        dirs.append(_SOURCE_DIR)
    return dirs


_warned: set = set()
_warn_lock = threading.Lock()


def _warn_once(key, message: str) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, TuningWarning, stacklevel=5)  # the caller of lookup()


@functools.lru_cache(maxsize=1)
def _installed_triton() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _running_versions(device: str) -> dict:
    """What the file's _meta is compared with: the device's cc (if device_name() resolved it
    in this process) and the installed Triton version."""
    return {"cc": _RUNNING_CC.get(device), "triton": _installed_triton()}


def _major_minor(version) -> tuple[int, int] | None:
    m = _VERSION_RE.match(version) if isinstance(version, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def _staleness(table: ConfigTable, device: str) -> list[str]:
    running = _running_versions(device)
    found = []
    cc = table.meta.get("cc")
    if cc and running.get("cc") and cc != running["cc"]:
        found.append(f"tuned on compute capability {cc}, running on {running['cc']}")
    if any(e["backend"] == "triton" for e in table.entries.values()):
        tuned, have = _major_minor(table.meta.get("triton")), _major_minor(running.get("triton"))
        if tuned and have and tuned != have:
            found.append(f"tuned with triton {table.meta['triton']}, running triton {running['triton']}")
    return found


def _static_text(static_t) -> str:
    return ",".join(f"{k}={v}" for k, v in static_t)


@functools.lru_cache(maxsize=None)
def _table_for(spec: OpSpec, device: str, static_t: tuple, env: str | None) -> ConfigTable | None:
    static = dict(static_t)
    name = config_file_name(spec, device, static)  # a bad static value is the caller's bug: raise
    dirs = search_dirs()
    if env and not Path(env).expanduser().is_dir():
        _warn_once(("env", env), f"kvkern: {ENV_DIR}={env!r} is not a directory; ignoring it")
    for d in dirs:
        path = d / spec.op / name
        try:
            if not path.is_file():
                continue
            table = load_config_file(path, spec)
        except (ConfigFileError, OSError) as err:
            why = "; ".join(err.problems) if isinstance(err, ConfigFileError) else str(err)
            _warn_once(("bad", str(path)), f"kvkern: ignoring the tuned config {path}: {why}")
            continue
        stale = _staleness(table, device)
        if stale:
            _warn_once(("stale", str(path)), f"kvkern: using the tuned config {path} although it was "
                       + " and ".join(stale) + "; retune for best speed (python -m autotune)")
        return table
    _warn_once(("missing", spec.op, device, static_t),
               f"kvkern: no tuned {spec.op} config for {device} ({_static_text(static_t)}) in "
               f"{[str(d) for d in dirs]}; using the built-in heuristics, which may be slower. "
               f"Tune this GPU with: python -m autotune --op {spec.op} "
               + " ".join(f"--{k.replace('_', '-')} {_format_value(k, v)}" for k, v in static_t)
               + " (see autotune/README.md)")
    return None


def nearest_value(values: Iterable[int], v: int) -> int:
    """The value nearest ``v`` on a log2 scale (``v`` clamped to >= 1), ties to the larger."""
    v = max(int(v), 1)

    def distance(k: int):
        # |log2 k - log2 v| compared exactly, as the ratio max/min >= 1.
        return (Fraction(max(k, v), min(k, v)) if k > 0 else Fraction(10**30), -k)

    return min(values, key=distance)


def nearest_bucket(keys: Iterable[tuple[int, ...]], point: tuple[int, ...]) -> tuple[int, ...]:
    """The bucketing rule (module docstring): dim by dim, nearest on a log2 scale, ties up."""
    remaining = list(keys)
    if not remaining:
        raise ValueError("nearest_bucket: no keys")
    for i, v in enumerate(point):
        best = nearest_value({k[i] for k in remaining}, v)
        remaining = [k for k in remaining if k[i] == best]
    return remaining[0]


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=4096)
def _lookup_cached(spec: OpSpec, device: str, static_t: tuple, dims_t: tuple, env: str | None):
    if sorted(k for k, _ in static_t) != sorted(spec.static) or len(static_t) != len(spec.static):
        raise ValueError(f"tuning.lookup({spec.op}): static keys must be {list(spec.static)}, "
                         f"got {[k for k, _ in static_t]}")
    dims = dict(dims_t)
    if sorted(dims) != sorted(spec.dims) or len(dims_t) != len(spec.dims):
        raise ValueError(f"tuning.lookup({spec.op}): dims must be {list(spec.dims)}, got {list(dims)}")
    static_t = tuple((k, dict(static_t)[k]) for k in spec.static)  # one table per key, any dict order
    table = _table_for(spec, device, static_t, env)
    if table is None:
        return None
    point = tuple(int(dims[d]) for d in spec.dims)
    return table.entries[nearest_bucket(table.entries, point)]


def lookup(spec: OpSpec, device_name: str, static: Mapping[str, Any], dims: Mapping[str, int]) -> dict | None:
    """The tuned entry for this op, device, static key and dims, or None (use a heuristic).

    Args:
        spec: the op's OpSpec.
        device_name: from :func:`device_name`.
        static: ``{name: value}`` for every name in ``spec.static`` (selects the file).
        dims: ``{name: int}`` for every name in ``spec.dims`` (bucketed, see the module docstring).

    Returns a new dict ``{"backend": ..., <config keys>: int, "us": float}``.
    Never raises because of a file's content; raises ValueError for keys that
    do not match ``spec`` (a bug in the caller).
    """
    env = os.environ.get(ENV_DIR) or None
    try:
        entry = _lookup_cached(spec, device_name, tuple(static.items()), tuple(dims.items()), env)
    except TypeError:  # unhashable values (lists): freeze them
        entry = _lookup_cached(spec, device_name, _freeze(tuple(static.items())), tuple(dims.items()), env)
    return dict(entry) if entry is not None else None


_clear_hooks: list[Callable[[], None]] = []


def on_clear_caches(hook: Callable[[], None]) -> None:
    """Has :func:`clear_caches` also call ``hook``: for caches built on lookups (the front
    doors' backend choice), which would otherwise keep answering from the old files."""
    _clear_hooks.append(hook)


def clear_caches() -> None:
    """Forgets parsed files, looked-up entries, choices made from them and which warnings
    were given."""
    for hook in _clear_hooks:
        hook()
    _lookup_cached.cache_clear()
    _table_for.cache_clear()
    _load_cached.cache_clear()
    with _warn_lock:
        _warned.clear()
