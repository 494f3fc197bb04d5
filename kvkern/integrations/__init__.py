# SPDX-License-Identifier: Apache-2.0
"""kvkern inside model code: Hugging Face transformers (:mod:`kvkern.integrations.hf`) and the
offline real model and text the demo and tests use (:mod:`kvkern.integrations.offline`).

Nothing here is imported by ``import kvkern``: transformers is an optional dependency.
"""
