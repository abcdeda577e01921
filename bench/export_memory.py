"""``python -m bench.export_memory``: peak memory and wall time of ``python -m export`` as the model grows.

Builds sharded random-weight fp16 checkpoints in the HF layout (``model-0000k-of-0000n.safetensors`` and
``model.safetensors.index.json``) for Cohere configs of about 0.1B, 0.5B and 2B parameters, writing each tensor as
it is generated, so building the largest holds one tensor. Each is exported (fp16, ONNX) without and with
verification in a subprocess; its peak RSS (VmHWM, see ``measure``), wall time and weight bytes go to a JSON file,
with the peak RSS of an interpreter that only imports the exporter as the baseline.

    python -m bench.export_memory --sizes 0.1b 0.5b --json build/export-memory.json
    python -m bench.export_memory --sizes 0.1b --repo ../other-checkout   # the same runs of another version
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from engines.cli import configure_logging
from reference import CohereConfig, CohereForCausalLM
from reference.checkpoint import cache_dir
from reference.presets import TINY_SEED
from reference.weights import INDEX_FILE

from .checkpoints import _write_tokenizer

log = logging.getLogger("bench.export_memory")

REPO = Path(__file__).resolve().parents[1]


def _config(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> CohereConfig:
    return CohereConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=10_000.0,
                        logit_scale=0.0625, bos_token_id=5, eos_token_id=9, pad_token_id=0)


# Command-R-shaped (GQA, tied embeddings, no qk-norm); about 0.08B, 0.50B and 1.98B parameters.
SIZES = {
    "0.1b": _config(vocab=32768, hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4),
    "0.5b": _config(vocab=65536, hidden=1536, intermediate=4096, layers=16, heads=12, kv_heads=4),
    "2b": _config(vocab=256000, hidden=2048, intermediate=8192, layers=24, heads=16, kv_heads=4),
}
DTYPE = torch.float16
SHARD_BYTES = 256 << 20
MODES = ("skip-verify", "verify")


def parameter_shapes(config: CohereConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in CohereForCausalLM(config).named_parameters()}


def random_tensor(name: str, shape: tuple[int, ...], seed: int = TINY_SEED) -> torch.Tensor:
    """The scales of ``reference.checkpoint.tiny_model`` (unit-variance embeddings, 1/sqrt(fan_in) matrices, norm
    weights near 1), from a generator seeded by the tensor's name, so a tensor does not depend on the others."""
    generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=generator)
    if name.endswith("norm.weight"):
        return 1 + 0.1 * values
    if name == "model.embed_tokens.weight":
        return values
    return values * shape[-1] ** -0.5


def write_checkpoint(folder: Path, config: CohereConfig, dtype: torch.dtype = DTYPE,
                     shard_bytes: int = SHARD_BYTES) -> None:
    """A random-weight checkpoint in the HF sharded layout, each tensor generated and written on its own."""
    shapes = parameter_shapes(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    code = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for k, names in enumerate(shards, 1):
        shard = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            nbytes = math.prod(shapes[name]) * itemsize
            header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = shard
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the safetensors library writes
        with open(folder / shard, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little") + encoded)
            for name in names:
                tensor = random_tensor(name, shapes[name]).to(dtype)
                f.write(tensor.view(torch.int16 if itemsize == 2 else torch.int32).numpy().tobytes())  # bf16 too
    total = sum(math.prod(s) * itemsize for s in shapes.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")
    hf_config = {"architectures": ["CohereForCausalLM"], "model_type": "cohere", **config.to_dict(),
                 "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    _write_tokenizer(folder, config.vocab_size)


def checkpoint(size: str, root: Path) -> Path:
    """The checkpoint of ``size`` under ``root``, generated on first use (complete or absent)."""
    config = SIZES[size]
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    folder = root / f"export-memory-{size}-{digest}"
    if (folder / INDEX_FILE).exists():
        return folder
    log.info("generating the %s checkpoint in %s", size, folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".export-memory-{size}-", dir=root))
    try:
        write_checkpoint(tmp, config)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# Runs ``python -m MODULE ARGS...`` and writes the process's peak resident memory (VmHWM) to $PEAK_RSS_FILE at exit.
# Not os.wait4's ru_maxrss: Linux folds the high-water mark of the memory a process had before exec into it, and
# with vfork (which subprocess uses) that is the parent's, so a parent that once held a large tensor would show
# its own peak as every child's. VmHWM is the high-water mark of the process's memory since exec.
_PEAK_WRAPPER = """
import os, runpy, sys
module = sys.argv.pop(1)
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    with open(os.environ["PEAK_RSS_FILE"], "w") as f:
        f.write(str(int(status["VmHWM"].split()[0]) * 1024))
"""


def measure(module: str, args: list[str], cwd: Path) -> dict:
    """Run ``python -m module args`` in ``cwd``; its wall time and peak RSS (its own, whatever this process holds)."""
    with tempfile.NamedTemporaryFile(prefix="peak-rss-") as peak:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, module, *args], cwd=cwd,
                                env=os.environ | {"PEAK_RSS_FILE": peak.name}, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"python -m {module} {' '.join(args)} failed (exit {result.returncode}):\n"
                               f"{result.stdout}{result.stderr}")
        return {"seconds": round(seconds, 2), "peak_rss_bytes": int(Path(peak.name).read_text())}


def export_args(folder: Path, out: Path, verify: bool) -> list[str]:
    """``python -m export`` arguments: fp16, ONNX only, a small cache (the weights are what is measured)."""
    return ["--model", str(folder), "--out", str(out), "--dtype", "float16", "--engine", "onnx", "--max-batch", "1",
            "--max-context", "256", "--memory-budget", "1000GB", *([] if verify else ["--skip-verify"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.export_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["0.1b", "0.5b"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", type=Path, default=Path("build/export-memory.json"), help="where results go")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="where the checkpoints are generated and kept (default: the project's cache)")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="the checkout whose `python -m export` is measured (default: this one)")
    args = parser.parse_args(argv)
    configure_logging(False, ["bench"])
    root = args.checkpoints or cache_dir()
    repo = args.repo.resolve()
    baseline = measure("export.build", [], repo)["peak_rss_bytes"]  # the interpreter with the exporter imported
    results = {"repo": str(repo), "dtype": "float16", "baseline_rss_bytes": baseline, "runs": []}
    for size in args.sizes:
        folder = checkpoint(size, root)
        weight_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        parameters = sum(math.prod(s) for s in parameter_shapes(SIZES[size]).values())
        for mode in args.modes:
            with tempfile.TemporaryDirectory(prefix="export-memory-", dir=root) as work:
                run = measure("export", export_args(folder, Path(work) / "artifact", mode == "verify"), repo)
            run |= {"size": size, "parameters": parameters, "mode": mode, "weight_bytes": weight_bytes,
                    "peak_rss_above_baseline_bytes": run["peak_rss_bytes"] - baseline}
            log.info("%s %s: %.1f s, peak RSS %.2f GB (%.2f GB above the baseline), weights %.2f GB", size, mode,
                     run["seconds"], run["peak_rss_bytes"] / 1e9, run["peak_rss_above_baseline_bytes"] / 1e9,
                     weight_bytes / 1e9)
            results["runs"].append(run)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
