"""Quality of an engine (a quantized artifact) against the unquantized reference, on real text.

Exactness (``export.parity``) holds an int8/int4 engine to the reference running the same dequantized weights;
it says the graph computes what it should, not whether the quantization is any good. This says the latter, as
llama.cpp's ``perplexity --kl-divergence`` and lm-eval-harness measure it: both sides are teacher-forced through
the same text and compared position by position:

* ``top1_agreement``: the fraction of positions where both predict the same next token;
* ``mean_kl``: KL(reference || engine) of the full next-token distributions, in nats, averaged over positions
  (float64 softmax of the float32 logits);
* ``perplexity_ratio``: the engine's perplexity of the text over the reference's (each is exp of the mean negative
  log-likelihood of the actual next tokens).

The text is cut into windows of ``window`` tokens spread evenly over it, up to ``max_tokens`` tokens in all; the
windows run as the rows of a batch, one token per step (the engines give logits for one position per row per
step), and each window's first token is context only: ``window - 1`` scored positions per window, as in
Hugging Face's fixed-window perplexity with a stride equal to the window.

    python -m export.parity ART                      # a quantized artifact: exactness and quality
    python -m export.parity ART --perplexity FILE    # any artifact, on your own UTF-8 text
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from engines.base import Engine

__all__ = ["measure", "format_table", "default_tokens", "file_tokens", "QualityTolerance", "QUALITY_TOLERANCES",
           "TextError"]

WINDOW = 128
MAX_TOKENS = 512  # 4 windows of 128 tokens: 508 scored positions, 127 steps of each engine


class TextError(ValueError):
    """A text (or tokenizer) that cannot be measured with; the message names the file."""


@dataclasses.dataclass(frozen=True)
class QualityTolerance:
    perplexity_ratio: float  # the engine's perplexity at most this many times the reference's
    top1_agreement: float  # at least this fraction of positions predict the same next token
    mean_kl: float  # nats per position, at most


# The perplexity ratios are the gates: int8 within 0.5% of the fp32 model, int4 (block 32) within 3%; int4
# at block 64/128 is held to the same 3%. The top-1 and KL bounds were set from measurements of round-to-nearest
# on this machine (defaults: 4 windows x 128 tokens of the held-out pydoc text), with room above the worst case:
#
#                               tiny (random)                     100m (random)
#                        top-1    mean KL   ppl ratio      top-1    mean KL   ppl ratio
#   int8 block 32/128   0.998    1.2e-6    1.00000      ...
#   int4 block 32       0.945    4.6e-4    1.00003
#   int4 block 128      0.915    7.8e-4    1.00004
#   scales off by 2x    0.67     0.06      1.06        (the deliberately broken quantization of the tests)
#
# A random-weight model predicts nearly uniformly (perplexity near the vocabulary size), so its KL is small and
# its argmax a near-tie that small errors flip: the top-1 bounds are set where random models of either size pass
# round-to-nearest, and the KL bounds where the broken quantization fails by an order of magnitude. A trained
# model is sharper: its KL grows and its top-1 rises, so the same bounds stay meaningful there.
QUALITY_TOLERANCES = {
    8: QualityTolerance(perplexity_ratio=1.005, top1_agreement=0.98, mean_kl=1e-3),
    4: QualityTolerance(perplexity_ratio=1.03, top1_agreement=0.85, mean_kl=1e-2),
}


def measure(reference: Engine, engine: Engine, tokens: list[int], bits: int | None, window: int = WINDOW,
            max_tokens: int = MAX_TOKENS) -> dict:
    """Teacher-force both engines through ``tokens`` and return the report (JSON-ready): one row per measure with
    its value, tolerance and result, the perplexity of each side, and ``passed``.

    ``bits``: 8 or 4 holds the engine to ``QUALITY_TOLERANCES[bits]``; None (an unquantized artifact) reports the
    figures without a gate. ``window`` is cut to the smaller ``max_context`` of the two engines.
    """
    windows = _windows(tokens, min(window, engine.spec.max_context, reference.spec.max_context), max_tokens)
    rows_at_once = min(engine.spec.max_batch, reference.spec.max_batch)
    stats = _Stats()
    for start in range(0, len(windows), rows_at_once):
        _teacher_force(reference, engine, windows[start:start + rows_at_once], stats)

    ppl_ref, ppl_ours = math.exp(stats.nll_ref / stats.positions), math.exp(stats.nll_ours / stats.positions)
    figures = {"top1_agreement": stats.agree / stats.positions, "mean_kl": stats.kl / stats.positions,
               "perplexity_ratio": ppl_ours / ppl_ref}
    tol = QUALITY_TOLERANCES[bits] if bits is not None else None
    finite = stats.non_finite == 0 and stats.ref_non_finite == 0
    rows = []
    for name, value in figures.items():
        if tol is None:
            rows.append({"output": name, "value": value, "tolerance": "reported", "passed": finite})
            continue
        bound = getattr(tol, name)
        at_least = name == "top1_agreement"
        rows.append({"output": name, "value": value, "tolerance": f"{'>=' if at_least else '<='} {bound:g}",
                     "passed": finite and math.isfinite(value) and (value >= bound if at_least else value <= bound)})
    return {"backend": engine.backend, "dtype": engine.spec.dtype, "reference_dtype": reference.spec.dtype,
            "bits": bits, "windows": len(windows), "window_tokens": windows.shape[1],
            "scored_positions": stats.positions, "perplexity": ppl_ours, "reference_perplexity": ppl_ref,
            "non_finite": stats.non_finite, "reference_non_finite": stats.ref_non_finite, "rows": rows,
            "passed": all(r["passed"] for r in rows)}


def format_table(report: dict) -> str:
    mode = f"int{report['bits']}" if report["bits"] is not None else "unquantized"
    lines = [f"quality of {report['backend']} ({mode}, {report['dtype']}) against the unquantized reference "
             f"({report['reference_dtype']}); {report['windows']} windows of {report['window_tokens']} tokens, "
             f"{report['scored_positions']} positions scored",
             f"  perplexity {report['perplexity']:.4f}, reference {report['reference_perplexity']:.4f}",
             f"  {'output':<22}{'value':>12}  {'tolerance':<22}result"]
    for r in report["rows"]:
        lines.append(f"  {r['output']:<22}{r['value']:>12.6g}  {r['tolerance']:<22}{'PASS' if r['passed'] else 'FAIL'}")
    non_finite = report["non_finite"] + report["reference_non_finite"]
    if non_finite:
        lines.append(f"  {non_finite} positions had NaN or inf logits: {report['non_finite']} of the engine, "
                     f"{report['reference_non_finite']} of the reference")
    lines.append(f"  overall: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)


def default_tokens(tokenizer_json: Path) -> list[int]:
    """The held-out part of the Python documentation text that ships with CPython (``reference.corpus``; the
    built-in trained model never saw it), tokenized with the artifact's tokenizer."""
    from reference.corpus import pydoc_text

    return _tokenize(tokenizer_json, pydoc_text("heldout"))


def file_tokens(text_file: Path, tokenizer_json: Path) -> list[int]:
    """A user's UTF-8 text file, tokenized with the artifact's tokenizer; TextError naming the file when it is
    missing, empty, binary or too short to score a single token."""
    text_file = Path(text_file)
    try:
        raw = text_file.read_bytes()
    except OSError as e:
        raise TextError(f"{text_file}: cannot read it ({e.strerror or e})") from None
    if b"\0" in raw:
        raise TextError(f"{text_file}: holds NUL bytes, so it is not a text file; pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{text_file}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); pass a UTF-8 text "
                        "file") from None
    if not text.strip():
        raise TextError(f"{text_file}: is empty; pass a text to measure perplexity on")
    tokens = _tokenize(tokenizer_json, text)
    if len(tokens) < 2:
        raise TextError(f"{text_file}: tokenizes to {len(tokens)} token; perplexity needs at least 2")
    return tokens


def _tokenize(tokenizer_json: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises a bare Exception for any missing or malformed file
        raise TextError(f"{tokenizer_json}: the tokenizers library cannot load it ({e})") from None
    # No special tokens: the windows are cut from anywhere in the text, so a BOS would start only the first one.
    return tokenizer.encode(text, add_special_tokens=False).ids


def _windows(tokens: list[int], window: int, max_tokens: int) -> np.ndarray:
    """``[count, length]`` int64: ``max_tokens // length`` windows (at least one) of ``length = min(window,
    len(tokens))`` tokens, spread evenly from the start of the text to its end, so a long text is sampled
    throughout rather than only at its beginning."""
    if window < 2 or max_tokens < 2:
        raise ValueError(f"window {window} and max_tokens {max_tokens} must each be at least 2 tokens")
    if len(tokens) < 2:
        raise ValueError(f"the text has {len(tokens)} tokens; perplexity needs at least 2")
    length = min(window, len(tokens))
    count = max(1, min(max_tokens // length, len(tokens) // length))
    starts = np.linspace(0, len(tokens) - length, count).round().astype(np.int64)
    ids = np.asarray(tokens, dtype=np.int64)
    return np.stack([ids[s:s + length] for s in starts])


@dataclasses.dataclass
class _Stats:
    positions: int = 0
    agree: int = 0
    kl: float = 0.0
    nll_ref: float = 0.0
    nll_ours: float = 0.0
    non_finite: int = 0  # positions whose logits held NaN or inf, of the engine
    ref_non_finite: int = 0


def _teacher_force(reference: Engine, engine: Engine, windows: np.ndarray, stats: _Stats) -> None:
    """Step both engines through ``windows`` (one row each), one token per step, and add up every position."""
    rows, length = windows.shape
    states = [reference.allocate(rows), engine.allocate(rows)]
    first = np.zeros(rows, np.int64)
    for t in range(length - 1):
        ref_logits, ours = [e.step(s, windows[:, t:t + 1], np.full(rows, t, np.int64), first)
                            for e, s in zip((reference, engine), states)]
        stats.ref_non_finite += int((~np.isfinite(ref_logits).all(-1)).sum())
        stats.non_finite += int((~np.isfinite(ours).all(-1)).sum())
        log_p, log_q = _log_softmax(ref_logits), _log_softmax(ours)
        following = windows[:, t + 1]
        stats.positions += rows
        stats.agree += int((ours.argmax(-1) == ref_logits.argmax(-1)).sum())
        stats.kl += float((np.exp(log_p) * (log_p - log_q)).sum())
        stats.nll_ref -= float(log_p[np.arange(rows), following].sum())
        stats.nll_ours -= float(log_q[np.arange(rows), following].sum())


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
