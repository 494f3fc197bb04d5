# SPDX-License-Identifier: Apache-2.0
"""The quality harness behind ``python -m kvkern demo`` and ``python -m kvkern eval``.

Compression is measured by loyalty to the full-cache run of the same model (the model is small):
per-token KL and top-1 agreement of next-token distributions, perplexity change, needle hit rate.

* :mod:`.metrics`: pure functions on logits.
* :mod:`.prompts`: needle-in-a-haystack prompts and real-text windows (deterministic given a seed).
* :mod:`.harness`: runs the DynamicCache reference and each ``kvkern.integrations.hf`` method.
* :mod:`.plots`: PNGs (Agg backend).
* :mod:`.cli`: the two subcommands.

Needs transformers (and, for the real model and text, the offline packages): nothing here is
imported by ``import kvkern``.
"""
