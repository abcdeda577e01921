"""Random-weight Cohere checkpoints of the sizes the benchmark runs, and their export through our pipeline.

Weights come from the same seeded generator as the built-in tiny model (``reference.checkpoint.tiny_model``), so
every run benchmarks the same numbers. The export runs as a subprocess, so its wall time and peak RSS are the
export's own and not this process's (which holds several models at once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from reference import CohereConfig
from reference.checkpoint import cache_dir, tiny_checkpoint, tiny_model
from reference.presets import PRESETS
from reference.weights import SINGLE_FILE, save_checkpoint

log = logging.getLogger(__name__)

# ~100M parameters (400 MB in fp32): a Command-R-shaped model (GQA, no qk-norm, tied embeddings) small enough
# to export, verify and benchmark against two other runtimes on a 2-core CPU within minutes.
SIZES: dict[str, CohereConfig] = {
    "tiny": PRESETS["tiny"].config,
    "100m": CohereConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, rope_theta=10_000.0, logit_scale=0.0625,
                         bos_token_id=5, eos_token_id=9, pad_token_id=0),
}

# Whether a size's tokenizer reads text: tiny's byte-level BPE does; the word-level test tokenizer written for the
# others (``_write_tokenizer``) reads every word as one unknown token.
TEXT_TOKENIZER = {"tiny": True, "100m": False}

# The artifacts every size is exported to: batch 16 and 2048-token prompts plus 256 generated tokens.
MAX_BATCH = 16
MAX_CONTEXT = 2304


def checkpoint(size: str) -> Path:
    """The checkpoint folder of ``size``, generated into the cache on first use."""
    if size == "tiny":
        return tiny_checkpoint()
    config = SIZES[size]
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / f"bench-{size}-{digest}"
    if (folder / SINGLE_FILE).exists():
        return folder
    log.info("generating the %s checkpoint in %s", size, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".bench-{size}-", dir=folder.parent))
    try:
        save_checkpoint(tiny_model(config), tmp)
        _write_tokenizer(tmp, config.vocab_size)
        tmp.rename(folder)  # complete or absent: a killed run never leaves a half checkpoint in the cache
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one token per id (``t0``, ``t1``…), so serve.Generator can load the artifact and
    detokenize every id the random model emits; the chat templates are the tiny model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_bytes(
        resources.files("reference.tiny").joinpath("tokenizer_config.json").read_bytes())


@dataclasses.dataclass
class ExportRun:
    seconds: float
    peak_rss_bytes: int
    weight_bytes: int


def export(folder: Path, out: Path, options: list[str] | tuple[str, ...] = ()) -> ExportRun:
    """``python -m export`` of ``folder`` into ``out`` (fp32 unless ``options`` say otherwise, ONNX only, parity
    verified), timed as a subprocess. ``options``: more arguments of ``python -m export`` (the last of a repeated
    option wins, as argparse takes it)."""
    command = [sys.executable, "-m", "export", "--model", str(folder), "--out", str(out), "--dtype", "float32",
               "--max-batch", str(MAX_BATCH), "--max-context", str(MAX_CONTEXT), "--engine", "onnx", *options]
    log.info("exporting: %s", " ".join(command[1:]))
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()  # until the child closes it, at exit; keeps a full pipe from blocking it
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen, so it does not wait
    if process.returncode != 0:
        raise RuntimeError(f"export of {folder} failed (exit {process.returncode}):\n{output}")
    weight_bytes = (folder / SINGLE_FILE).stat().st_size
    return ExportRun(seconds=seconds, peak_rss_bytes=usage.ru_maxrss * 1024, weight_bytes=weight_bytes)
