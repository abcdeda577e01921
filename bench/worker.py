"""``python -m bench.worker SPEC_JSON``: one runtime on one model file in a process of its own, so its resident
memory is its own and no other model's; prints one JSON object (timings and memory) on stdout.

SPEC: ``{"runtime": "ours" | "llama.cpp", "path": artifact folder or GGUF file, "vocab_size": int, "threads": int,
"n_ctx_per_row": int (llama.cpp), "scenarios": [[kind, batch, prompt_tokens, new_tokens], ...],
"warmup_prompt": int}``. Scenarios run in the given order, batch 1 first; memory is read after loading, after the
batch-1 scenarios (before the first larger batch) and at the end. The prompts depend on their shape only, so every
runtime gets the same ones.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from .runners import Ours, Timing


def resident_memory() -> dict:
    """This process's resident memory now (VmRSS) and its high-water mark since exec (VmHWM), in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(status[field].split()[0]) * 1024 for key, field in (("rss_bytes", "VmRSS"),
                                                                          ("hwm_bytes", "VmHWM"))}


def prompts(vocab_size: int, batch: int, length: int) -> np.ndarray:
    """The prompts of one scenario shape, the same in every process and runtime."""
    return np.random.default_rng([batch, length]).integers(0, vocab_size, (batch, length))


class LlamaCppRunner:
    def __init__(self, path: Path, threads: int, n_ctx_per_row: int):
        from .llamacpp import LlamaCpp

        self.llama = LlamaCpp(path, threads, n_ctx_per_row)

    def run(self, batch: np.ndarray, new_tokens: int) -> Timing:
        token_times: list[float] = []
        started = time.perf_counter()
        self.llama.generate(batch, new_tokens, on_token=lambda tokens: token_times.append(time.perf_counter()))
        return Timing.from_token_times(started, token_times)


def run(spec: dict) -> dict:
    result = {"memory": {"imports": resident_memory()}}
    started = time.perf_counter()
    if spec["runtime"] == "ours":
        runner = Ours(Path(spec["path"]))
    elif spec["runtime"] == "llama.cpp":
        runner = LlamaCppRunner(Path(spec["path"]), spec["threads"], spec["n_ctx_per_row"])
    else:
        raise ValueError(f"runtime {spec['runtime']!r}: expected 'ours' or 'llama.cpp'")
    result["load_s"] = time.perf_counter() - started
    result["memory"]["loaded"] = resident_memory()

    runs, warmed = [], set()
    for kind, batch, length, new_tokens in spec["scenarios"]:
        if batch not in warmed:
            if batch > 1 and "batch_1" not in result["memory"]:
                result["memory"]["batch_1"] = resident_memory()
            # The first call at a batch size pays for lazy initialisation (ORT's arena, llama.cpp's context of that
            # many rows): not what is measured. Warmed just before its scenarios, so the batch-1 memory reading
            # holds batch-1 state only.
            runner.run(prompts(spec["vocab_size"], batch, spec["warmup_prompt"]), 2)
            warmed.add(batch)
        timing = runner.run(prompts(spec["vocab_size"], batch, length), new_tokens)
        runs.append({"kind": kind, "batch": batch, "prompt_tokens": length, "new_tokens": new_tokens,
                     **dataclasses.asdict(timing)})
    result["memory"]["end"] = resident_memory()
    result["runs"] = runs
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        result = run(json.loads(argv[0]))
    except RuntimeError as e:  # a model file the runtime cannot load: one line for the benchmark's report
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
