# SPDX-License-Identifier: Apache-2.0
"""Run-time side of the per-GPU tuning database (STUB: being written)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpSpec:
    """What the database stores for one op.

    static: names of the shape parameters that select a file (fixed order).
    dims: names of the dynamic dimensions bucketed inside a file.
    """

    op: str
    static: tuple[str, ...]
    dims: tuple[str, ...]


def lookup(spec: OpSpec, device_name: str, static: dict, dims: dict) -> dict | None:
    return None
