"""Where one decode step of our ONNX Runtime engine spends its time: ORT's own profiler, totals per op type."""

from __future__ import annotations

import collections
import json
import logging
import statistics
from pathlib import Path

import numpy as np

from engines import Artifact
from engines.greedy import greedy
from engines.onnxruntime import OnnxRuntimeEngine

log = logging.getLogger(__name__)


def decode_step_profile(artifact: Path, out: Path, prompt_tokens: int = 64, steps: int = 8,
                        portable: bool = False) -> dict:
    """Prefill ``prompt_tokens`` at batch 1, then profile ``steps`` decode steps; per-op-type milliseconds per step
    (medians over the steps), and how much of a step no kernel accounts for (IO binding, Python, ORT's scheduling).
    The prefill's own per-op-type milliseconds come with it (one run: where a long prompt's time goes).

    ``portable``: profile the portable graph (``model.onnx``) even where the artifact has ONNX Runtime CPU's
    GroupQueryAttention variant, which is what is profiled otherwise (the graph ``open_engine`` runs on CPU)."""
    # The graph and accuracy level ONNX Runtime CPU runs the artifact with, as open_engine does.
    engine = OnnxRuntimeEngine.from_artifact(Artifact.open(artifact), "cpu", portable=portable,
                                             profile_prefix=str(out / "ort-profile"))

    prompt = np.random.default_rng(1).integers(0, engine.spec.vocab_size, prompt_tokens).tolist()
    greedy(engine, [prompt], 1 + steps)  # the prefill's token, then one per decode step
    trace_path = Path(engine.session.end_profiling())
    events = json.loads(trace_path.read_text())

    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    decode_runs = runs[1:]  # the first is the prefill
    prefill_op_us: collections.Counter[str] = collections.Counter()
    # Per node, the median over the decode steps: on a shared 2-core machine one step of a few is often
    # preempted, and a mean would pin that pause on whichever kernel it hit.
    node_us: dict[str, list[float]] = collections.defaultdict(list)
    node_op: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if runs[0][0] <= e["ts"] <= runs[0][1]:
            prefill_op_us[e["args"]["op_name"]] += e["dur"]
        elif any(start <= e["ts"] <= end for start, end in decode_runs):
            node_us[e["name"]].append(e["dur"])
            node_op[e["name"]] = e["args"]["op_name"]
    per_op: collections.Counter[str] = collections.Counter()
    for node, durations in node_us.items():
        per_op[node_op[node]] += statistics.median(durations)
    run_ms = statistics.median(end - start for start, end in decode_runs) / 1e3
    kernels_ms = sum(per_op.values()) / 1e3
    ops = {op: us / 1e3 for op, us in per_op.most_common()}
    log.info("ORT decode step: %.2f ms in run(), %.2f ms in kernels; top ops: %s", run_ms, kernels_ms,
             ", ".join(f"{op} {ms:.2f} ms" for op, ms in list(ops.items())[:5]))
    return {"prompt_tokens": prompt_tokens, "graph": engine.onnx_path.name,
            "steps": len(decode_runs), "run_ms_per_step": run_ms, "kernel_ms_per_step": kernels_ms,
            "op_ms_per_step": ops, "prefill_run_ms": (runs[0][1] - runs[0][0]) / 1e3,
            "prefill_op_ms": {op: us / 1e3 for op, us in prefill_op_us.most_common()}, "trace": trace_path.name}
