# SPDX-License-Identifier: Apache-2.0
"""Triton launchers: see KERNELS."""

KERNELS: dict = {}
