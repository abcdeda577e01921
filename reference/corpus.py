"""Text that ships with every CPython: the documentation topics of ``pydoc_data``, split for training and held-out
evaluation (the built-in ``tiny-trained`` model learns from one part; perplexity is measured on the other)."""

from __future__ import annotations

HELDOUT_FRACTION = 0.05  # the last 5% of the text, from a paragraph boundary


def pydoc_text(split: str) -> str:
    """The topics in name order, separated by blank lines: the first 95% ("train") or the rest ("heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split {split!r}: choose 'train' or 'heldout'")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name].strip() for name in sorted(topics))
    cut = text.index("\n\n", int(len(text) * (1 - HELDOUT_FRACTION)))
    return text[:cut] if split == "train" else text[cut + 2:]
