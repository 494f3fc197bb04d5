# SPDX-License-Identifier: Apache-2.0
"""The dispatcher holds exactly the kernels the manifest names; every op passes opcheck."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import kvkern
from kvkern import _manifest

from utils import make_decode_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Keys a kvkern kernel could plausibly be registered under by mistake.
CHECKED_KEYS = ("CPU", "CUDA", "Meta", "CompositeExplicitAutograd", "CompositeImplicitAutograd",
                "Autograd", "AutogradCPU", "AutogradCUDA")


def registered_ops() -> set[str]:
    return {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("kvkern::")}


def test_every_op_is_in_the_manifest():
    assert registered_ops() == set(_manifest.OPS)


@pytest.mark.parametrize("op", sorted(_manifest.OPS))
def test_dispatch_keys_match_manifest(op):
    expected = _manifest.expected_dispatch_keys(
        op, with_cuda=bool(kvkern.BUILD_INFO and kvkern.BUILD_INFO["with_cuda"]),
        triton_available=kvkern._triton_backend.AVAILABLE,
    )
    found = {k for k in CHECKED_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(f"kvkern::{op}", k)}
    assert found == expected, f"kvkern::{op}: kernels for {sorted(found)}, manifest says {sorted(expected)}"


def test_import_has_no_warnings():
    # A second kernel for the same (op, key) is only a UserWarning, and it silently
    # replaces the first: importing kvkern must warn about nothing.
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-W", "error", "-c", "import kvkern"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_public_api():
    assert callable(kvkern.decode_attention)
    assert kvkern.__version__
    for op in _manifest.OPS:
        assert hasattr(torch.ops.kvkern, op)


OPCHECK_CASES = {
    "decode_attention": lambda: make_decode_inputs(2, 6, 2, 33, 64, torch.float32, DEVICE, with_log_w=True),
}


@pytest.mark.parametrize("op", ["decode_attention", "decode_attention_triton"])
@pytest.mark.parametrize("with_log_w", [True, False])
def test_opcheck(op, with_log_w):
    base = op[: -len("_triton")] if op.endswith("_triton") else op
    key = "CUDA" if DEVICE == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"kvkern::{op}", key):
        pytest.skip(f"kvkern::{op} has no {key} kernel in this process")
    q, k, v, lengths, log_w = OPCHECK_CASES[base]()
    args = (q, k, v, lengths, log_w if with_log_w else None, 0.3)
    torch.library.opcheck(getattr(torch.ops.kvkern, op).default, args)


def test_info_command_lists_every_base_op(capsys):
    from kvkern.__main__ import main

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    bases = {op for op, family in _manifest.OPS.items() if family == "cpp"}
    assert set(info["ops"]) == bases
    assert all("cpu" in info["ops"][op]["cpu"] for op in bases)
    assert main(["info"]) == 0
    assert "decode_attention" in capsys.readouterr().out
