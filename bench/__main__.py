"""``python -m bench``: export random-weight Cohere checkpoints and measure our engine against the reference model,
HF transformers and this machine's memory bandwidth, then our int8 and int4 artifacts against our fp32 one and
llama.cpp's f32, Q8_0 and Q4_K_M files of the same checkpoint, then long contexts (``bench.long_context``: the 100m
checkpoint with an 8192-token cache; the tiny one with 512 under --quick), in one run. Writes results.json,
results.md and results.png.

    python -m bench                       # tiny and 100m, 3 repeats (about an hour on a 2-core CPU)
    python -m bench --llama-cpp-source vendor/llama.cpp   # with llama.cpp as a peer (llama-cpp-python installed)
    python -m bench --sizes tiny --quick  # a smoke test of the whole benchmark
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from engines.cli import configure_logging

from . import checkpoints, llamacpp, long_context, machine, quantized, report, runners
from .profile import decode_step_profile

log = logging.getLogger("bench")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run. TTFT runs generate a few tokens too: the last of them gives the step time at a long position."""

    ttft_prompts: tuple[int, ...]
    ttft_new_tokens: int
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_new_tokens: int

    def scenarios(self) -> list[tuple[str, int, int, int]]:
        """(kind, batch, prompt tokens, new tokens) of every run, in the order they are run."""
        return ([("ttft", 1, n, self.ttft_new_tokens) for n in self.ttft_prompts]
                + [("decode", b, self.decode_prompt, self.decode_new_tokens) for b in self.decode_batches])


FULL = Plan(ttft_prompts=(32, 512, 2048), ttft_new_tokens=5, decode_batches=(1, 4, 16), decode_prompt=64,
            decode_new_tokens=16)
QUICK = Plan(ttft_prompts=(32, 256), ttft_new_tokens=3, decode_batches=(1, 4), decode_prompt=64,
             decode_new_tokens=6)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,100m",
                        help=f"comma-separated model sizes: {', '.join(checkpoints.SIZES)} (default: tiny,100m)")
    parser.add_argument("--out", type=Path, default=Path("build/bench"), help="output folder (default: build/bench)")
    parser.add_argument("--repeats", type=int, help="repeats of every measurement (default: 3, 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="short prompts, few tokens: a smoke test")
    parser.add_argument("--no-transformers", action="store_true", help="skip HF transformers (if not installed)")
    parser.add_argument("--llama-cpp-source", type=Path,
                        help=f"a llama.cpp source tree (with {llamacpp.CONVERTER} and gguf-py) to convert the "
                             f"checkpoints with; default: ${llamacpp.SOURCE_ENV}. Without it, or without "
                             "llama-cpp-python, llama.cpp is skipped, saying why")
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in checkpoints.SIZES]
    if unknown or not args.sizes:
        parser.error(f"--sizes: unknown size {unknown[0] if unknown else '(none)'}; "
                     f"choose from {', '.join(checkpoints.SIZES)}")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def make_runners(size: str, folder: Path, artifact: Path, with_transformers: bool) -> list:
    """Every runtime on the same weights; ours first, the baseline last."""
    made = [runners.Ours(artifact), runners.Serve(artifact),
            runners.Reference(folder, checkpoints.MAX_BATCH, checkpoints.MAX_CONTEXT)]
    if with_transformers:
        made.append(runners.Transformers(folder))
    log.info("%s: benchmarking %s", size, ", ".join(r.name for r in made))
    return made


def bench_size(size: str, plan: Plan, repeats: int, out: Path, with_transformers: bool,
               quantized_plan: quantized.Plan, quick: bool, llama_cpp_source: Path | None) -> dict:
    folder = checkpoints.checkpoint(size)
    artifact = out / "artifacts" / size
    export = checkpoints.export(folder, artifact)
    log.info("%s: export took %.1f s, peak RSS %.0f MB for %.1f MB of weights", size, export.seconds,
             export.peak_rss_bytes / 1e6, export.weight_bytes / 1e6)
    runs = measure(size, make_runners(size, folder, artifact, with_transformers), plan, repeats)
    # The runners (several copies of the weights) are gone by now: the profile runs on a quiet machine.
    return {"checkpoint": str(folder), "config": checkpoints.SIZES[size].to_dict(),
            "export": dataclasses.asdict(export), "artifact_bytes": report.artifact_weight_bytes(artifact),
            "kv_bytes_per_row_per_step": report.kv_bytes_per_row(
                checkpoints.SIZES[size], plan.decode_prompt + plan.decode_new_tokens // 2),
            "runs": runs, "profile": decode_step_profile(artifact, out, plan.decode_prompt),
            "quantized": quantized.bench_size(size, folder, out, artifact, quantized_plan, repeats, quick,
                                              llama_cpp_source)}


def measure(size: str, engines: list, plan: Plan, repeats: int) -> list[dict]:
    """Every scenario on every engine, ``repeats`` times, on the same prompts."""
    vocab = checkpoints.SIZES[size].vocab_size
    rng = np.random.default_rng(0)
    prompts = {(batch, length): rng.integers(0, vocab, (batch, length)) for _, batch, length, _ in plan.scenarios()}

    # First calls pay for lazy initialisation (ORT's arena, torch's kernels) per shape: not what is measured.
    for engine in engines:
        for batch in sorted({b for _, b, _, _ in plan.scenarios()}):
            engine.run(prompts[(batch, plan.decode_prompt)], 2)

    runs = []
    total = repeats * len(plan.scenarios()) * len(engines)
    started = time.perf_counter()
    for repeat in range(repeats):
        for kind, batch, length, new_tokens in plan.scenarios():
            # Side by side: every engine runs a scenario before the next scenario, so drift in the machine's
            # speed hits all of them alike.
            for engine in engines:
                timing = engine.run(prompts[(batch, length)], new_tokens)
                runs.append({"engine": engine.name, "kind": kind, "batch": batch, "prompt_tokens": length,
                             "new_tokens": new_tokens, "repeat": repeat, **dataclasses.asdict(timing)})
                log.info("%s [%d/%d] repeat %d, %s batch %d prompt %d: %s TTFT %.3f s, step %.1f ms", size,
                         len(runs), total, repeat + 1, kind, batch, length, engine.name, timing.ttft_s,
                         timing.step_s * 1e3)
    log.info("%s: measured in %.0f s", size, time.perf_counter() - started)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(verbose=False, loggers=("bench",))
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine.describe(), "plan": dataclasses.asdict(plan), "repeats": args.repeats,
               "max_batch": checkpoints.MAX_BATCH, "max_context": checkpoints.MAX_CONTEXT}
    # Measured first, before any model is in memory, on a 1 GiB array (a quarter of that under --quick).
    results["machine"]["read_bandwidth_bytes_per_s"] = machine.read_bandwidth(0.25 if args.quick else 1.0)
    llama_cpp_source = llamacpp.source_folder(args.llama_cpp_source)
    quantized_plan = quantized.QUICK if args.quick else quantized.FULL
    results["sizes"] = {size: bench_size(size, plan, args.repeats, args.out, not args.no_transformers,
                                         quantized_plan, args.quick, llama_cpp_source)
                        for size in args.sizes}
    results["trained"] = quantized.trained_model(args.out, args.quick)
    long_plan = long_context.QUICK if args.quick else long_context.FULL
    if args.quick or long_plan.size in args.sizes:
        results["long_context"] = long_context.bench(long_plan, args.repeats, args.out, not args.no_transformers,
                                                     llama_cpp_source)
    report.summarise(results)
    results["wall_s"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report.plot(results, args.out / "results.png")
    (args.out / "results.md").write_text(report.markdown(results))
    print(report.markdown(results))
    log.info("wrote %s/results.{json,md,png} in %.0f s", args.out, results["wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
