"""``python -m bench.serve_memory``: resident memory and decode speed of a serving process, per ONNX Runtime setting.

Each run is a child process of its own: it opens the artifact with ``serve.Generator`` on the CPU, generates
``--new-tokens`` greedy tokens after a prompt of ``--prompt-tokens`` tokens and reports its resident memory
(VmRSS of /proc/self/status) after loading and after generating, its peak (VmHWM), the artifact's weight bytes, the
ratio of the resident memory after generating to them, and decode tokens/s. The bound it is checked against is
issue 12's: at most 1.5x the weight bytes + 300 MB (llama.cpp holds 1.5x). Configurations change the session
options on top of what ``engines/onnxruntime.py`` sets (``engine``), so each of its choices can be measured against
ONNX Runtime's default; runs of the configurations are interleaved, repeat by repeat, as the machine may be shared.

    python -m export --model CHECKPOINT --out build/100m --dtype float32 --max-batch 16 --max-context 2304 \\
        --skip-verify      # the benchmark's 100M checkpoint: bench/checkpoints.py checkpoint("100m")
    python -m bench.serve_memory --artifact build/100m --prompt-tokens 32 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

from engines.cli import configure_logging

log = logging.getLogger("bench.serve_memory")

REPO = Path(__file__).resolve().parents[1]
BOUND_FACTOR, BOUND_CONSTANT_BYTES = 1.5, 300 * 10**6  # issue 12: RSS <= 1.5x the weight bytes + 300 MB

# Session options set after the engine's own: config entries (``add_session_config_entry``) and attributes.
CONFIGS: dict[str, dict[str, dict]] = {
    "engine": {},  # as engines/onnxruntime.py sets the session up: prepacked weights, no CPU arena
    "arena": {"attrs": {"enable_cpu_mem_arena": True}},  # ONNX Runtime's defaults, which the engine had before
    "no-prepacking": {"entries": {"session.disable_prepacking": "1"}},  # weights read in place from the mmapped file
}

def resident_bytes() -> dict[str, int]:
    """This process's resident memory now (VmRSS) and its peak since exec (VmHWM), in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(status[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def override_session_options(config: dict[str, dict]) -> None:
    """Make every ONNX Runtime session of this process apply ``config`` to the options it is given, after the
    engine has set its own."""
    import onnxruntime as ort

    original = ort.InferenceSession

    def session(model, options=None, *args, **kwargs):
        for key, value in config.get("entries", {}).items():
            options.add_session_config_entry(key, value)
        for name, value in config.get("attrs", {}).items():
            setattr(options, name, value)
        return original(model, options, *args, **kwargs)

    ort.InferenceSession = session


def measure(artifact: Path, config: dict[str, dict], prompt_tokens: int, new_tokens: int) -> dict:
    """One run, in this process (a fresh child): load, generate, and read the resident memory after each."""
    from serve import Generator

    override_session_options(config)
    baseline = resident_bytes()["VmRSS"]
    started = time.perf_counter()
    generator = Generator(artifact, backend="onnxruntime-cpu")
    load_seconds = time.perf_counter() - started
    loaded = resident_bytes()["VmRSS"]
    # Random weights emit their eos token at random: without stop tokens every run decodes new_tokens.
    generator.stop_token_ids = frozenset()
    vocab = generator.spec.vocab_size
    prompt = [(11 + 7 * i) % vocab for i in range(prompt_tokens)]
    result = generator.generate(prompt, max_new_tokens=new_tokens, temperature=0)
    after = resident_bytes()
    return {"baseline_rss_bytes": baseline, "load_rss_bytes": loaded, "generate_rss_bytes": after["VmRSS"],
            "peak_rss_bytes": after["VmHWM"], "weight_bytes": generator.artifact.manifest.memory.weight_bytes,
            "generated_tokens": result.completion_tokens, "load_seconds": round(load_seconds, 3),
            "decode_tokens_per_s": result.decode_tokens_per_s}


def with_ratio(run: dict) -> dict:
    """``run`` with the resident memory after generating against the weight bytes: the ratio and the bound."""
    bound = BOUND_FACTOR * run["weight_bytes"] + BOUND_CONSTANT_BYTES
    return run | {"ratio": run["generate_rss_bytes"] / run["weight_bytes"], "bound_bytes": int(bound),
                  "within_bound": run["generate_rss_bytes"] <= bound}


def run_child(artifact: Path, name: str, prompt_tokens: int, new_tokens: int) -> dict:
    """``measure`` in a child process, so each run's memory is its own."""
    command = [sys.executable, "-m", "bench.serve_memory", "--artifact", str(artifact), "--child", name,
               "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed (exit {result.returncode}):\n{result.stderr}")
    run = json.loads(result.stdout.splitlines()[-1])
    return with_ratio(run | {"config": name, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens})


def summarize(runs: list[dict]) -> list[dict]:
    """Per configuration and prompt length: the median of each figure over the repeats, the best decode speed."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["config"], run["prompt_tokens"]), []).append(run)
    summary = []
    for (name, prompt_tokens), group in groups.items():
        speeds = [r["decode_tokens_per_s"] for r in group]
        summary.append({"config": name, "prompt_tokens": prompt_tokens, "repeats": len(group),
                        **{key: statistics.median(r[key] for r in group)
                           for key in ("load_rss_bytes", "generate_rss_bytes", "peak_rss_bytes", "ratio")},
                        "weight_bytes": group[0]["weight_bytes"], "bound_bytes": group[0]["bound_bytes"],
                        "within_bound": all(r["within_bound"] for r in group),
                        "decode_tokens_per_s": {"median": statistics.median(speeds), "best": max(speeds)}})
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, required=True, help="the artifact folder `python -m export` wrote")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("build/serve-memory.json"), help="where results go")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.artifact, CONFIGS[args.child], args.prompt_tokens[0], args.new_tokens)))
        return
    configure_logging(False, ["bench"])
    runs = []
    for repeat in range(args.repeats):
        for prompt_tokens in args.prompt_tokens:
            for name in args.configs:
                run = run_child(args.artifact.resolve(), name, prompt_tokens, args.new_tokens)
                log.info("%s, %d-token prompt: RSS %.0f MB loaded, %.0f MB after %d tokens (%.2fx the weights), "
                         "%.1f tokens/s", name, prompt_tokens, run["load_rss_bytes"] / 1e6,
                         run["generate_rss_bytes"] / 1e6, run["generated_tokens"], run["ratio"],
                         run["decode_tokens_per_s"] or 0)
                runs.append(run | {"repeat": repeat})
    results = {"artifact": str(args.artifact.resolve()), "bound": f"{BOUND_FACTOR}x the weight bytes + "
               f"{BOUND_CONSTANT_BYTES // 10**6} MB", "summary": summarize(runs), "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
