"""Text that ships with every CPython: the documentation of the language in ``pydoc_data.topics`` (what ``help()``
prints for keywords and topics), split once into a training part and a held-out part.

The ``tiny-trained`` model learned from ``pydoc_text("train")`` (tools/train_tiny_trained.py); the held-out part is
text it never saw, to measure its perplexity. The split holds out whole topics, every 20th of the sorted topic names
from the 7th on (about 5% of the characters), so it never depends on dict order. The text itself is the running
interpreter's documentation, so it changes a little from one Python version to another.

No torch here: this is imported where only a default text is wanted.
"""

from __future__ import annotations

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 20
HELDOUT_OFFSET = 6


def pydoc_topics(split: str) -> list[str]:
    """The texts of the topics of ``split``, in the sorted order of their names, stripped of surrounding space."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    heldout = set(names[HELDOUT_OFFSET::HELDOUT_EVERY])
    return [topics[name].strip() for name in names if (name in heldout) == (split == "heldout")]


def pydoc_text(split: str) -> str:
    """The topics of ``split`` as one text, separated by a blank line."""
    return "\n\n".join(pydoc_topics(split)) + "\n"
