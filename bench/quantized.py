"""Weight-only quantized artifacts against our fp32 artifact and against llama.cpp's files of the same checkpoint.

Every variant of a checkpoint is exported by ``python -m export`` (int8 with blocks of 128, int4 with blocks of 32
and 128, ONNX Runtime's accuracy level 4: int8 activations inside its MatMulNBits kernels, its fast path), and,
where llama.cpp is available (``bench.llamacpp``), converted to llama.cpp's f32, Q8_0 and Q4_K_M files. Each
runtime then runs in a process of its own (``bench.worker``), so its resident memory is its own; the processes of
one repeat run one after another, every runtime once per repeat, and ratios are taken within a repeat, as the rest
of the benchmark does. fp16 is exported for its bytes and quality only: ONNX Runtime's CPU kernels compute fp16
MatMuls slowly, which measures nothing a CPU user would run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from engines import Artifact

from . import checkpoints, llamacpp
from .profile import decode_step_profile
from .report import artifact_weight_bytes

log = logging.getLogger(__name__)

# The targets are at 2 threads; ONNX Runtime uses every core, which is 2 on the machine they are stated for.
LLAMA_CPP_THREADS = 2
ACCURACY_LEVEL = "4"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    export_options: tuple[str, ...]
    timed: bool  # measured for speed and memory (fp16: bytes and quality only, see the module docstring)


def _quantized(bits: int, block: int) -> Variant:
    return Variant(f"int{bits}-b{block}", ("--quantize", f"int{bits}", "--block-size", str(block),
                                           "--ort-accuracy-level", ACCURACY_LEVEL), True)


VARIANTS = (Variant("fp32", (), True), Variant("fp16", ("--dtype", "float16"), False), _quantized(8, 128),
            _quantized(4, 32), _quantized(4, 128))

# (ours, theirs): the file a CPU user would otherwise pick at the same width.
PEERS = {"int8-b128": "Q8_0", "int4-b32": "Q4_K_M", "int4-b128": "Q4_K_M", "fp32": "f32"}


@dataclasses.dataclass(frozen=True)
class Plan:
    ttft_prompt: int
    decode_prompt: int
    decode_new_tokens: int
    batches: tuple[int, ...]

    def scenarios(self) -> list[list]:
        """(kind, batch, prompt, new tokens), batch 1 first: the worker reads memory before the first larger batch."""
        return ([["ttft", 1, self.ttft_prompt, 2]]
                + [["decode", b, self.decode_prompt, self.decode_new_tokens] for b in sorted(self.batches)])


FULL = Plan(ttft_prompt=512, decode_prompt=64, decode_new_tokens=32, batches=(1, 16))
QUICK = Plan(ttft_prompt=256, decode_prompt=32, decode_new_tokens=6, batches=(1, 4))


def export_variants(size: str, folder: Path, out: Path, fp32_artifact: Path,
                    shape_options: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every variant's artifact (fp32: the benchmark's own), its bytes and the export's time and peak memory.
    The variants skip export's verification: the benchmark measures their quality itself (``measure_quality``) and
    reports it, where export's gate would stop the whole benchmark at the first variant past its bound, without the
    figures that say by how much (the 100m checkpoint's word-level test tokenizer reads the held-out text as one
    unknown token repeated, on which int8 fails export's perplexity gate)."""
    exported = {}
    for variant in VARIANTS:
        if variant.name == "fp32":
            artifact, export = fp32_artifact, None
        else:
            artifact = out / "artifacts" / f"{size}-{variant.name}"
            options = [*shape_options, *variant.export_options, "--skip-verify"]
            export = dataclasses.asdict(checkpoints.export(folder, artifact, options))
            log.info("%s %s: exported in %.0f s", size, variant.name, export["seconds"])
        manifest = Artifact.open(artifact).manifest
        exported[variant.name] = {"artifact": str(artifact), "export": export,
                                  "artifact_bytes": artifact_weight_bytes(artifact),
                                  "quantization": manifest.quantization and dataclasses.asdict(manifest.quantization),
                                  "parity": _parity_summary(manifest.parity)}
    return exported


def _parity_summary(parity) -> dict | None:
    """What export measured, per backend: passed, and each compared output's row (the scenario's details stay in
    the manifest)."""
    if parity is None:
        return None
    return {"skipped": parity.skipped, "unmeasured": parity.unmeasured,
            "reports": {backend: {"passed": report.get("passed"), "rows": report.get("rows")}
                        for backend, report in parity.reports.items()}}


class WorkerError(RuntimeError):
    """The runtime could not load or run its file (the worker said why in one line)."""


def run_worker(spec: dict) -> dict:
    environment = os.environ | (llamacpp.ENVIRONMENT if spec["runtime"] == "llama.cpp" else {})
    result = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec)], capture_output=True, text=True,
                            env=environment)
    if result.returncode == 1 and result.stderr.startswith("error: "):
        raise WorkerError(result.stderr.removeprefix("error: ").strip())
    if result.returncode != 0:
        raise RuntimeError(f"bench.worker {spec['runtime']} {spec['path']} failed (exit {result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def bench_size(size: str, folder: Path, out: Path, fp32_artifact: Path, plan: Plan, repeats: int, quick: bool,
               llama_cpp_source: Path | None) -> dict:
    vocab = checkpoints.SIZES[size].vocab_size
    variants = export_variants(size, folder, out, fp32_artifact)
    runtimes = {f"ours {v.name}": {"runtime": "ours", "path": variants[v.name]["artifact"]}
                for v in VARIANTS if v.timed}
    peer = {"skipped": llamacpp.unavailable_reason(llama_cpp_source)}
    if peer["skipped"] is None:
        try:
            # Named by the checkpoint's folder (its config digest): files converted from another config are not reused.
            peer = llamacpp.convert(folder, llama_cpp_source, out / "llama.cpp" / folder.name)
        except RuntimeError as e:  # a converter or quantizer that fails on this checkpoint skips the peer, saying why
            log.warning("%s: llama.cpp skipped: %s", size, e)
            peer = {"skipped": str(e)}
    if "skipped" in peer:
        log.info("%s: llama.cpp skipped: %s", size, peer["skipped"])
    else:
        # Ours first, each followed by the llama.cpp file of its width: neighbours in time see the same machine.
        order = []
        for name in runtimes:
            order.append(name)
            theirs = f"llama.cpp {PEERS[name.removeprefix('ours ')]}"
            if theirs not in order:
                order.append(theirs)
        paths = {f"llama.cpp {t}": {"runtime": "llama.cpp", "path": p} for t, p in peer["files"].items()}
        runtimes = {name: runtimes.get(name) or paths[name] for name in order}

    n_ctx_per_row = max(plan.ttft_prompt, plan.decode_prompt) + plan.decode_new_tokens + 8
    results: dict[str, list] = {name: [] for name in runtimes}
    for repeat in range(repeats):
        for name, runtime in list(runtimes.items()):
            if name not in runtimes:
                continue
            spec = {**runtime, "vocab_size": vocab, "threads": LLAMA_CPP_THREADS, "n_ctx_per_row": n_ctx_per_row,
                    "scenarios": plan.scenarios(), "warmup_prompt": plan.decode_prompt}
            try:
                measured = run_worker(spec)
            except WorkerError as e:
                if runtime["runtime"] != "llama.cpp":
                    raise
                # llama.cpp converted the checkpoint but cannot run it: the peer is skipped, saying why.
                log.warning("%s: llama.cpp skipped: %s", size, e)
                peer = {"skipped": f"{name}: {e}"}
                for dropped in [n for n, r in runtimes.items() if r["runtime"] == "llama.cpp"]:
                    del runtimes[dropped], results[dropped]
                continue
            results[name].append(measured)
            b1 = next(r for r in measured["runs"] if r["kind"] == "decode" and r["batch"] == 1)
            log.info("%s repeat %d/%d, %s: %.1f tok/s at batch 1, RSS %.0f MB", size, repeat + 1, repeats, name,
                     b1["decode_steps"] / b1["decode_s"], measured["memory"]["batch_1"]["rss_bytes"] / 1e6)
    summary = summarise(results, plan)
    summary["variants"] = variants
    summary["llama_cpp"] = {k: v for k, v in peer.items() if k != "files"} | (
        {"threads": LLAMA_CPP_THREADS, "n_ctx_per_row": n_ctx_per_row} if "skipped" not in peer else {})
    for name in summary["figures"]:
        kind, _, label = name.partition(" ")
        summary["figures"][name]["file_bytes"] = (variants[label]["artifact_bytes"] if kind == "ours"
                                                  else peer["bytes"][label])
    # Where a quantized step goes, beside the fp32 profile of the same size.
    summary["profiles"] = {v.name: decode_step_profile(Path(variants[v.name]["artifact"]), out, plan.decode_prompt)
                           for v in VARIANTS if v.timed and v.name != "fp32"}
    summary["quality"] = measure_quality(size, folder, variants, quick, checkpoints.TEXT_TOKENIZER[size],
                                         checkpoints.SIZES[size].vocab_size)
    summary["runs"] = results
    summary["plan"] = dataclasses.asdict(plan)
    return summary


def measure_quality(size: str, checkpoint: Path, variants: dict[str, dict], quick: bool, reads_text: bool,
                    vocab_size: int) -> dict:
    """Every variant (fp32 too, as the check that the measure reads 0 where nothing changed) against the unquantized
    fp32 reference, teacher-forced through the same tokens: top-1 agreement, mean KL and the perplexity ratio
    (``export.quality``, as export's quality gate measures them). The tokens are the held-out Python documentation
    text where the checkpoint's tokenizer reads text, else random ids (see ``checkpoints.TEXT_TOKENIZER``)."""
    import torch

    from engines import open_engine
    from export import quality
    from export.reference_engine import ReferenceEngine

    if reads_text:
        tokens = quality.default_tokens(checkpoint / "tokenizer.json")
        text = "held-out Python documentation text (reference.corpus)"
    else:
        tokens = np.random.default_rng(0).integers(0, vocab_size, quality.MAX_TOKENS).tolist()
        text = ("random token ids (this checkpoint's word-level test tokenizer reads any text as one unknown "
                "token)")
    max_tokens = quality.WINDOW if quick else quality.MAX_TOKENS
    # Loaded whole (not streamed): it runs once per variant, and its cache holds one batch of windows only.
    reference = ReferenceEngine.load(checkpoint, max_tokens // quality.WINDOW, quality.WINDOW, torch.float32)
    reports = {}
    for name, variant in variants.items():
        artifact = Artifact.open(variant["artifact"])
        bits = artifact.manifest.quantization and artifact.manifest.quantization.bits
        with open_engine(artifact, "onnxruntime-cpu") as engine:
            reports[name] = quality.measure(reference, engine, tokens, bits, max_tokens=max_tokens)
        figures = {r["output"]: r["value"] for r in reports[name]["rows"]}
        log.info("%s %s quality: top-1 %.4f, mean KL %.3g, perplexity %.4f (reference %.4f)", size, name,
                 figures["top1_agreement"], figures["mean_kl"], reports[name]["perplexity"],
                 reports[name]["reference_perplexity"])
    return {"text": text, "reports": reports}


TRAINED = "tiny-trained"
# Quality only: its windows are 128 tokens, 4 at a time.
TRAINED_SHAPE = ("--max-batch", "4", "--max-context", "256")


def trained_model(out: Path, quick: bool) -> dict:
    """The quality rows on a model that has learned something (perplexity means something there): every variant of
    the built-in trained preset, against its unquantized reference on held-out text it never saw."""
    from reference.checkpoint import resolve_checkpoint
    from reference.presets import PRESETS

    if TRAINED not in PRESETS:
        return {"skipped": f"the {TRAINED} preset (a small trained Cohere model) is not in this checkout"}
    folder = resolve_checkpoint(TRAINED)
    fp32 = out / "artifacts" / TRAINED
    checkpoints.export(folder, fp32, TRAINED_SHAPE)
    variants = export_variants(TRAINED, folder, out, fp32, TRAINED_SHAPE)
    config = PRESETS[TRAINED].config
    return {"checkpoint": str(folder), "config": config.to_dict(), "variants": variants,
            "quality": measure_quality(TRAINED, folder, variants, quick, True, config.vocab_size)}


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise(results: dict[str, list], plan: Plan) -> dict:
    """Figures per runtime, ratios per repeat (ours against llama.cpp at the same width, and against our fp32), and
    the issue's targets."""

    def series(name: str, kind: str, batch: int, value) -> list[float]:
        return [value(next(r for r in m["runs"] if r["kind"] == kind and r["batch"] == batch)) for m in results[name]]

    def tok_s(name, batch):
        return series(name, "decode", batch, lambda r: r["batch"] * r["decode_steps"] / r["decode_s"])

    def ttft(name):
        return series(name, "ttft", 1, lambda r: r["ttft_s"])

    def memory(name, when, key):
        return statistics.median(m["memory"][when][key] for m in results[name])

    figures = {name: {
        "decode_tokens_per_s": {str(b): _stats(tok_s(name, b)) for b in plan.batches},
        f"ttft_{plan.ttft_prompt}_s": _stats(ttft(name)),
        "rss_bytes_after_batch_1": memory(name, "batch_1", "rss_bytes"),
        "hwm_bytes_after_batch_1": memory(name, "batch_1", "hwm_bytes"),
        "rss_bytes_at_end": memory(name, "end", "rss_bytes"),
        "hwm_bytes_at_end": memory(name, "end", "hwm_bytes"),
        "rss_bytes_imports": memory(name, "imports", "rss_bytes"),
        "load_s": statistics.median(m["load_s"] for m in results[name]),
    } for name in results}

    pairs = [(f"ours {ours}", f"llama.cpp {theirs}") for ours, theirs in PEERS.items()]
    pairs += [(f"ours {v.name}", "ours fp32") for v in VARIANTS if v.timed and v.name != "fp32"]
    ratios = {}
    for a, b in pairs:
        if a in results and b in results:
            ratios[f"{a} / {b}"] = {
                **{f"decode_b{batch}": _stats([x / y for x, y in zip(tok_s(a, batch), tok_s(b, batch))])
                   for batch in plan.batches},
                f"ttft_{plan.ttft_prompt}": _stats([x / y for x, y in zip(ttft(a), ttft(b))]),
            }
    targets = []
    for ours, theirs, bound in (("int4-b32", "llama.cpp Q4_K_M", 1.0), ("int4-b128", "llama.cpp Q4_K_M", 1.0),
                                ("int4-b32", "ours fp32", 2.5), ("int4-b128", "ours fp32", 2.5),
                                ("int8-b128", "llama.cpp Q8_0", 1.0)):
        stats = ratios.get(f"ours {ours} / {theirs}", {}).get("decode_b1")
        if stats is not None:
            targets.append({"target": f"decode tok/s, batch 1, ours {ours} / {theirs}", "bound": f">= {bound:g}",
                            "min": stats["min"], "median": stats["median"], "met": stats["median"] >= bound})
    return {"figures": figures, "ratios": ratios, "targets": targets}
