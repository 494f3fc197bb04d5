# SPDX-License-Identifier: Apache-2.0
"""Prompts for the quality harness: needle-in-a-haystack and real-text windows.

Everything is deterministic given ``seed``: the same tokenizer, text and seed give the same
token ids. Texts come from :mod:`kvkern.integrations.offline` unless passed in (tests pass their own).

The needle prompt uses the completion format (no chat template): SmolLM2-135M-Instruct finds a
6-digit pass key reliably that way at 1K-3K tokens (see ``shared/specs/real-model-and-data.md``),
and the answer is the model's continuation of ``"... The pass key is"``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"

# A sentence ends at . ! or ? followed by whitespace or, in the essays' flattened text, directly by
# a capital letter ("accelerating.We").
_SENTENCE_END = re.compile(r"(?<=[.!?])(?:\s+|(?=[A-Z]))")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a BOS would shift every position)."""
    if hasattr(tokenizer, "__call__") and not isinstance(tokenizer, type):
        try:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        except TypeError:
            pass
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def pass_key(seed: int, *salt) -> str:
    """A 6-digit pass key (first digit nonzero) determined by ``seed`` and ``salt``."""
    rng = random.Random(repr((seed,) + tuple(salt)))
    return str(rng.randint(100000, 999999))


@dataclass
class NeedlePrompt:
    """A needle-in-a-haystack prompt.

    ``input_ids``: ``[1, T]`` int64. ``needle_token_start``: index of the first needle token
    (approximate to a token at the boundary). ``depth``: requested fraction of the haystack before
    the needle; ``actual_depth``: the fraction of haystack characters before it (on a sentence boundary).
    """

    text: str
    input_ids: torch.Tensor
    key: str
    depth: float
    actual_depth: float
    target_tokens: int
    needle_token_start: int
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[-1])


def _haystack_source(texts: Sequence[str] | None, seed: int) -> str:
    if texts is None:
        from kvkern.integrations.offline import paul_graham_essays

        texts = paul_graham_essays()
    texts = [re.sub(r"\s+", " ", t).strip() for t in texts if t.strip()]
    # The seed rotates which essay the haystack starts with; the order after it is fixed.
    start = random.Random(seed).randrange(len(texts))
    return " ".join(texts[start:] + texts[:start])


def needle_prompt(tokenizer, length: int, depth: float, *, seed: int = 0, key: str | None = None,
                  texts: Sequence[str] | None = None) -> NeedlePrompt:
    """A prompt of about ``length`` tokens with a pass-key sentence at fraction ``depth`` of the haystack.

    The needle is inserted on the sentence boundary nearest ``depth`` (0 = first, 1 = last); the
    question at the end asks for the key in completion format. The token count is within a few
    tokens of ``length`` (the haystack is cut on a sentence boundary; tokenization at the seams may
    merge). ``key`` defaults to :func:`pass_key` of (seed, length, depth).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle_prompt: depth must be in [0, 1], got {depth}")
    key = key or pass_key(seed, length, round(depth, 6))
    needle = NEEDLE.format(key=key)
    overhead = len(encode(tokenizer, INSTRUCTION)) + len(encode(tokenizer, needle)) + len(encode(tokenizer, QUESTION))
    budget = length - overhead
    if budget < 8:
        raise ValueError(f"needle_prompt: length {length} leaves no room for a haystack (needs > {overhead + 8})")
    source = _haystack_source(texts, seed)
    ids = encode(tokenizer, source[: budget * 12 + 1000])  # chars per token is well under 12
    hay = decode(tokenizer, ids[:budget])
    # Cut the haystack at its last sentence end so the question follows a whole sentence.
    ends = [m.start() for m in _SENTENCE_END.finditer(hay)]
    if ends and ends[-1] > len(hay) // 2:
        hay = hay[: ends[-1]]
    hay = hay.strip()
    bounds = [0] + [m.start() for m in _SENTENCE_END.finditer(hay)] + [len(hay)]
    cut = min(bounds, key=lambda b: (abs(b - depth * len(hay)), b))
    before, after = hay[:cut].rstrip(), hay[cut:].lstrip()
    # Needle has a leading space; at depth 0 it opens the haystack.
    text = INSTRUCTION + (before + needle if before else needle.lstrip()) + (" " + after if after else "") + QUESTION
    needle_start = len(encode(tokenizer, INSTRUCTION + before))
    input_ids = torch.tensor([encode(tokenizer, text)], dtype=torch.long)
    return NeedlePrompt(text=text, input_ids=input_ids, key=key, depth=depth,
                        actual_depth=cut / max(len(hay), 1), target_tokens=length,
                        needle_token_start=needle_start, meta={"seed": seed, "format": "completion"})


@dataclass
class TextWindow:
    """A real-text window: ``prompt_ids`` ``[1, P]`` (compressed) and ``target_ids`` ``[1, C]``
    (teacher-forced continuation, the real text)."""

    source: str
    index: int
    prompt_ids: torch.Tensor
    target_ids: torch.Tensor


def text_windows(tokenizer, source: str, *, prompt_tokens: int, continuation_tokens: int, count: int,
                 seed: int = 0, texts: Sequence[str] | None = None) -> list[TextWindow]:
    """``count`` windows of ``prompt_tokens + continuation_tokens`` consecutive tokens.

    ``source``: ``"essays"`` (Paul Graham) or ``"wiki"`` (Wikipedia summaries, joined with blank
    lines, since each summary is short). Windows start at seeded, non-overlapping offsets in the
    concatenated corpus.
    """
    if texts is None:
        from kvkern.integrations import offline

        texts = offline.paul_graham_essays() if source == "essays" else offline.wiki_summaries() if source == "wiki" else None
        if texts is None:
            raise ValueError(f"text_windows: source must be 'essays' or 'wiki', got {source!r}")
    rng = random.Random(repr((seed, source)))
    need = prompt_tokens + continuation_tokens
    # Tokenize a seeded slice of the corpus large enough for `count` windows, not the whole corpus.
    joiner = "\n\n" if source == "wiki" else " "
    clean = [re.sub(r"[ \t]+", " ", t).strip() for t in texts if t.strip()]
    order = list(range(len(clean)))
    rng.shuffle(order)
    chunk, ids = [], []
    for i in order:
        chunk.append(clean[i])
        if sum(len(c) for c in chunk) > need * count * 6 + 2000:
            ids = encode(tokenizer, joiner.join(chunk))
            if len(ids) >= need * count:
                break
    else:
        ids = encode(tokenizer, joiner.join(chunk))
    if len(ids) < need * count:
        raise ValueError(f"text_windows: corpus {source!r} has only {len(ids)} tokens, need {need * count}")
    windows = []
    for w in range(count):
        seg = ids[w * need:(w + 1) * need]
        windows.append(TextWindow(source=source, index=w,
                                  prompt_ids=torch.tensor([seg[:prompt_tokens]], dtype=torch.long),
                                  target_ids=torch.tensor([seg[prompt_tokens:]], dtype=torch.long)))
    return windows
