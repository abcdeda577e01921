"""Parity of an engine against the reference model, Polygraphy-style: per-output error against a stated tolerance.

The scenario: a batch of prompts of different lengths (right-padded, so rows sit at different positions), one
prefill, then several decode steps fed the reference's greedy tokens (teacher forcing, so both sides see the same
inputs); logits and every KV cache are compared after each step. Then each side generates greedily on its own
and the continuations are compared.

As a command users put in their own CI:

    python -m export.parity build/tiny-float32 [--backend onnxruntime|tensorrt] [--model CHECKPOINT]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

from engines.base import Engine, GraphSpec
from engines.cli import configure_logging
from engines.greedy import greedy, right_pad, teacher_forced

from .reference_engine import ReferenceEngine

# greedy and right_pad live in engines.greedy; callers that know them from here still find them.
__all__ = ["measure", "format_table", "greedy", "right_pad", "scenario", "Tolerance", "TOLERANCES", "main"]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    logits_max_abs: float
    cache_max_abs: float
    top1_agreement: float  # at least this fraction of compared positions agree on the argmax
    greedy_must_match: bool
    relative: bool = False  # the max_abs bounds are fractions of the largest reference value


# fp32: the graph computes what the reference computes, up to reordered float sums.
# fp16: weights, activations and caches are rounded to 11 bits; logits stay fp32. The bounds are relative to
# how large the values are (max |reference|), since fp16 error grows with magnitude.
TOLERANCES = {
    "float32": Tolerance(logits_max_abs=1e-4, cache_max_abs=1e-4, top1_agreement=1.0, greedy_must_match=True),
    "float16": Tolerance(logits_max_abs=2e-2, cache_max_abs=1e-2, top1_agreement=0.9, greedy_must_match=False,
                         relative=True),
}
# A quantized artifact on ONNX Runtime CPU at accuracy level 4: each MatMulNBits rounds its input activations to
# int8 (one scale per block), about 0.4% of a block's largest value, so the engine is held to the reference with
# the same dequantized weights within a bound relative to the values' size, as fp16 is.
INT8_ACTIVATIONS = Tolerance(logits_max_abs=5e-2, cache_max_abs=5e-2, top1_agreement=0.9, greedy_must_match=False,
                             relative=True)


def tolerance_for(dtype: str, quantized_activations: bool) -> Tolerance:
    """The exactness bound of an engine computing in ``dtype``, with int8 activations in its quantized matmuls."""
    if not quantized_activations:
        return TOLERANCES[dtype]
    fp = TOLERANCES[dtype]
    return Tolerance(logits_max_abs=max(fp.logits_max_abs, INT8_ACTIVATIONS.logits_max_abs),
                     cache_max_abs=max(fp.cache_max_abs, INT8_ACTIVATIONS.cache_max_abs),
                     top1_agreement=min(fp.top1_agreement, INT8_ACTIVATIONS.top1_agreement), greedy_must_match=False,
                     relative=True)


@dataclasses.dataclass
class ErrorStats:
    """The largest error over the values finite on both sides, and how many values were not finite on each side.

    A NaN or infinity anywhere is a failure of its own: NaN compares false with every bound, so an error statistic
    that took it in would pass an engine whose logits are all NaN (or two sides that are both NaN).
    """

    max_abs: float = 0.0
    ref_max_abs: float = 0.0
    non_finite: int = 0  # NaN or ±inf values of the engine
    ref_non_finite: int = 0  # NaN or ±inf values of the reference

    def add(self, ours: np.ndarray, ref: np.ndarray) -> None:
        ours, ref = ours.astype(np.float64), ref.astype(np.float64)
        finite_ours, finite_ref = np.isfinite(ours), np.isfinite(ref)
        self.non_finite += int(ours.size - finite_ours.sum())
        self.ref_non_finite += int(ref.size - finite_ref.sum())
        both = finite_ours & finite_ref
        if both.any():
            self.max_abs = max(self.max_abs, float(np.abs(ours[both] - ref[both]).max()))
        if finite_ref.any():
            self.ref_max_abs = max(self.ref_max_abs, float(np.abs(ref[finite_ref]).max()))

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.ref_max_abs if self.ref_max_abs else 0.0


# The reference's own bounds when it verifies an artifact: the scenario below uses at most 3 rows and 25 slots,
# export/quality.py 4 rows of 128-token windows. A reference sized like the artifact would allocate its whole fp32
# cache (Command-R: 2.6 MB per token, 64 GB for 3 rows of 8192) to use a few hundred slots of it.
REFERENCE_MAX_BATCH, REFERENCE_MAX_CONTEXT = 4, 256


def reference_bounds(spec: GraphSpec) -> tuple[int, int]:
    """``(max_batch, max_context)`` of the reference that verifies an engine of ``spec``."""
    return min(spec.max_batch, REFERENCE_MAX_BATCH), min(spec.max_context, REFERENCE_MAX_CONTEXT)


# Tokens the scenario's last step appends to its first row (fewer to the others) after the decode steps.
CONTINUATION = 4


def scenario(vocab_size: int, max_batch: int, max_context: int, seed: int = 0) -> tuple[list[list[int]], int, int]:
    """Prompts of different lengths (up to 3 rows), how many decode steps fit after them, and how many tokens the
    continuation step then appends (0 when they do not fit)."""
    rng = np.random.default_rng(seed)
    longest = max(1, min(16, max_context // 4))
    lengths = [longest, longest // 2 + 1, 1][:max_batch]
    prompts = [rng.integers(0, vocab_size, n).tolist() for n in lengths]
    decode_steps = max(1, min(8, max_context - longest - 1))
    continuation = CONTINUATION if longest + decode_steps + CONTINUATION <= max_context else 0
    return prompts, decode_steps, continuation


def measure(reference: Engine | torch.nn.Module, engine: Engine, seed: int = 0,
            tolerance: Tolerance | None = None) -> dict:
    """Run the scenario on both and return the report (dict, JSON-ready) with pass/fail per output.

    ``reference``: a ``ReferenceEngine``, or the reference model itself (wrapped in one of the engine's bounds).
    ``tolerance``: the bound to hold the engine to (default: its dtype's).
    """
    spec = engine.spec
    if not isinstance(reference, Engine):
        reference = ReferenceEngine(reference, spec.max_batch, spec.max_context)
    prompts, decode_steps, continuation = scenario(spec.vocab_size, spec.max_batch, spec.max_context, seed)
    logits_err, cache_err, agree, compared = ErrorStats(), ErrorStats(), 0, 0

    for step in teacher_forced([reference, engine], prompts, decode_steps, continuation):
        ref_logits, ours = step.logits
        ref_state, state = step.states
        logits_err.add(ours, ref_logits)
        agree += int((ours.argmax(-1) == ref_logits.argmax(-1)).sum())
        compared += len(prompts)
        for (k, v), (rk, rv) in zip(engine.read_cache(state), reference.read_cache(ref_state)):
            for b, filled in enumerate(step.filled):  # only the slots holding real tokens of the row
                cache_err.add(k[b, :, :filled], rk[b, :, :filled])
                cache_err.add(v[b, :, :filled], rv[b, :, :filled])

    greedy_ref = greedy(reference, prompts, decode_steps)
    greedy_ours = greedy(engine, prompts, decode_steps)

    tol = tolerance or TOLERANCES[spec.dtype]
    scale_l = logits_err.ref_max_abs if tol.relative else 1.0
    scale_c = cache_err.ref_max_abs if tol.relative else 1.0
    rows = [
        _row("logits", logits_err, tol.logits_max_abs * scale_l),
        _row("kv_cache", cache_err, tol.cache_max_abs * scale_c),
    ]
    top1 = agree / compared
    rows.append({"output": "top1_agreement", "value": top1, "tolerance": f">= {tol.top1_agreement}",
                 "passed": top1 >= tol.top1_agreement})
    same = greedy_ref == greedy_ours
    rows.append({"output": "greedy_continuation", "value": "equal" if same else "differs",
                 "tolerance": "equal" if tol.greedy_must_match else "reported", "passed":
                 same or not tol.greedy_must_match})
    return {"backend": engine.backend, "dtype": spec.dtype, "reference_dtype": reference.spec.dtype,
            "prompt_lengths": [len(p) for p in prompts], "decode_steps": decode_steps,
            "continuation_tokens": continuation, "rows": rows,
            "greedy_tokens_equal": same, "passed": all(r["passed"] for r in rows)}


def _row(name: str, err: ErrorStats, bound: float) -> dict:
    return {"output": name, "max_abs": err.max_abs, "max_rel": err.max_rel, "tolerance": f"max_abs <= {bound:.3g}",
            "non_finite": err.non_finite, "reference_non_finite": err.ref_non_finite,
            "passed": err.max_abs <= bound and err.non_finite == 0 and err.ref_non_finite == 0}


def format_table(report: dict) -> str:
    lines = [f"parity of {report['backend']} ({report['dtype']}) against the reference ({report['reference_dtype']}); "
             f"prompts {report['prompt_lengths']}, {report['decode_steps']} decode steps, then "
             f"{report['continuation_tokens']} tokens more",
             f"  {'output':<22}{'max_abs':>12}{'max_rel':>12}  {'tolerance':<22}result"]
    for r in report["rows"]:
        if "max_abs" in r:
            non_finite = r["non_finite"] + r["reference_non_finite"]
            lines.append(f"  {r['output']:<22}{r['max_abs']:>12.3e}{r['max_rel']:>12.3e}  {r['tolerance']:<22}"
                         f"{'PASS' if r['passed'] else 'FAIL'}"
                         + (f" ({non_finite} values NaN or inf: {r['non_finite']} of the engine, "
                            f"{r['reference_non_finite']} of the reference)" if non_finite else ""))
        else:
            value = f"{r['value']:.4f}" if isinstance(r["value"], float) else r["value"]
            lines.append(f"  {r['output']:<22}{value:>12}{'':>12}  {r['tolerance']:<22}"
                         f"{'PASS' if r['passed'] else 'FAIL'}")
    lines.append(f"  overall: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from engines import BACKENDS, Artifact, ArtifactError, EngineError, open_engine
    from reference import CheckpointError, CohereConfig, ConfigError, ModelNotFoundError, resolve_checkpoint
    from reference.quantize import WeightQuantization

    from . import quality
    from .reference_engine import StreamedReferenceEngine

    parser = argparse.ArgumentParser(
        prog="python -m export.parity",
        description="Re-measure an artifact against the reference model on any available backend; prints a "
                    "per-output error table and exits 1 past the tolerance for the artifact's dtype. A quantized "
                    "artifact is measured twice: for exactness against the reference running the same dequantized "
                    "weights, and for quality (top-1 agreement, KL divergence, perplexity) against the unquantized "
                    "reference on held-out text.")
    parser.add_argument("artifact", help="artifact folder written by `python -m export`")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="engine to measure (default: auto)")
    parser.add_argument("--model", help="checkpoint for the reference (default: the artifact's source, as "
                                        "recorded in its manifest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt tokens (default: 0)")
    parser.add_argument("--perplexity", metavar="FILE", type=Path,
                        help="measure quality and perplexity on this UTF-8 text file, for any artifact, quantized or "
                             "not (default: quantized artifacts only, on held-out Python documentation text)")
    parser.add_argument("--max-tokens", type=int, default=quality.MAX_TOKENS,
                        help=f"tokens of the text to score, in windows of {quality.WINDOW} spread over it "
                             f"(default: {quality.MAX_TOKENS})")
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error(f"--max-tokens {args.max_tokens}: must be at least 2")
    configure_logging(verbose=False, loggers=("reference", "export", "engines"))
    try:
        artifact = Artifact.open(args.artifact)
        tokenizer = artifact.path("tokenizer.json")
        tokens = quality.file_tokens(args.perplexity, tokenizer) if args.perplexity else None  # refused first
        quantization = artifact.manifest.quantization
        if quantization is not None and tokens is None:
            tokens = quality.default_tokens(tokenizer)
        # The fp32 reference streamed layer by layer from the checkpoint, as export's verification runs it: the
        # check costs what running the artifact costs, not a whole fp32 copy of the model.
        folder = resolve_checkpoint(args.model or artifact.manifest.source.model)
        config = CohereConfig.from_json_file(folder / "config.json")
        with open_engine(artifact, args.backend) as engine:
            spec = engine.spec
            unquantized = StreamedReferenceEngine(folder, config, *reference_bounds(spec))
            if quantization is None:
                reference, tolerance = unquantized, None
            else:
                method = WeightQuantization(quantization.bits, quantization.block_size, quantization.method)
                reference = StreamedReferenceEngine(folder, config, *reference_bounds(spec),
                                                    quantized=(method, getattr(torch, quantization.scale_dtype)))
                # The accuracy level is ONNX Runtime CPU's: only there do its kernels quantize the activations.
                tolerance = tolerance_for(spec.dtype, engine.backend == "onnxruntime-cpu"
                                          and quantization.onnxruntime_accuracy_level == 4)
            report = measure(reference, engine, args.seed, tolerance)
            quality_report = None
            if tokens is not None:
                quality_report = quality.measure(unquantized, engine, tokens, quantization and quantization.bits,
                                                 max_tokens=args.max_tokens)
    except (ArtifactError, EngineError, ConfigError, CheckpointError, ModelNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if quantization is not None:
        print(f"exactness against the reference with the same int{quantization.bits} weights "
              f"(block {quantization.block_size}, ONNX Runtime accuracy level "
              f"{quantization.onnxruntime_accuracy_level}):")
    print(format_table(report))
    passed = report["passed"]
    if quality_report is not None:
        print(quality.format_table(quality_report))
        passed = passed and quality_report["passed"]
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
