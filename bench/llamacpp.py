"""llama.cpp as a peer: the same checkpoint converted by llama.cpp's own ``convert_hf_to_gguf.py``, quantized by
llama.cpp's own ``llama_model_quantize`` (through the llama-cpp-python bindings), and run through its C API.

Optional: ``unavailable_reason`` says why llama.cpp cannot be benchmarked here (the bindings are not installed, no
converter was given), and the benchmark then skips it with that reason.

The converter needs the llama.cpp source tree (``convert_hf_to_gguf.py`` with its ``conversion`` package and
``gguf-py``): pip installs of llama-cpp-python carry only the compiled library, so the source is an option
(``--llama-cpp-source`` or ``$LLAMA_CPP_SOURCE``; llama-cpp-python's sdist vendors it under ``vendor/llama.cpp``).

The benchmark's checkpoints carry a word-level test tokenizer, which the converter cannot write as a BPE vocabulary
(its pre-tokenizer hash is unknown and it has no merges). The benchmark feeds token ids and never text, so the
checkpoint is converted with no vocabulary (llama.cpp's ``none`` tokenizer model, as its converter writes for
models without a tokenizer) and the vocabulary size: weights, hyper-parameters and the compute graph are the
converter's own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE_ENV = "LLAMA_CPP_SOURCE"
CONVERTER = "convert_hf_to_gguf.py"
# The files llama.cpp users pick on a CPU: the converter's f32, then llama_model_quantize's 8- and 4-bit types.
TYPES = ("f32", "Q8_0", "Q4_K_M")

# Runs the converter with Command-R's vocabulary written as llama.cpp's "none" model plus the vocabulary size (see the
# module docstring). argv: the converter's folder, then the converter's own arguments.
_CONVERT = """
import runpy, sys
source = sys.argv.pop(1)
sys.path[:0] = [source, source + "/gguf-py"]
from conversion.command_r import CommandR2Model

def set_vocab(self):
    self._set_vocab_none()
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])

CommandR2Model.set_vocab = set_vocab
sys.argv[0] = source + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def source_folder(option: Path | None) -> Path | None:
    """The llama.cpp source tree: the option, else ``$LLAMA_CPP_SOURCE``, else none."""
    if option is not None:
        return option
    return Path(os.environ[SOURCE_ENV]) if os.environ.get(SOURCE_ENV) else None


def unavailable_reason(source: Path | None) -> str | None:
    """Why llama.cpp cannot be benchmarked here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not importable ({e}); pip install llama-cpp-python to benchmark llama.cpp"
    if source is None:
        return (f"no llama.cpp source tree for {CONVERTER}: pass --llama-cpp-source DIR or set ${SOURCE_ENV} "
                "(llama-cpp-python's sdist has one under vendor/llama.cpp)")
    if not (source / CONVERTER).is_file() or not (source / "gguf-py").is_dir():
        return f"{source} has no {CONVERTER} and gguf-py/: not a llama.cpp source tree"
    return None


def convert(checkpoint: Path, source: Path, out: Path) -> dict:
    """``out/model-f32.gguf``, ``-Q8_0`` and ``-Q4_K_M`` from ``checkpoint``; reused when already there (the
    checkpoints are cached by their config, and the folder is the benchmark's own). Returns the files and the
    seconds each took."""
    import llama_cpp

    out.mkdir(parents=True, exist_ok=True)
    files, seconds = {}, {}
    f32 = out / "model-f32.gguf"
    if not f32.exists():
        partial = out / "model-f32.gguf.partial"
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _CONVERT, str(source), str(checkpoint), "--outfile",
                                 str(partial), "--outtype", "f32"], capture_output=True, text=True)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"{source / CONVERTER} failed on {checkpoint} (exit {result.returncode}):\n"
                               f"{result.stderr[-4000:]}")
        partial.rename(f32)
        seconds["f32"] = time.perf_counter() - started
    files["f32"] = f32
    for name in TYPES[1:]:
        path = out / f"model-{name}.gguf"
        if not path.exists():
            partial = out / f"model-{name}.gguf.partial"
            _keep_errors_only(llama_cpp)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            params.nthread = os.cpu_count() or 1
            started = time.perf_counter()
            status = llama_cpp.llama_model_quantize(str(f32).encode(), str(partial).encode(), ctypes.byref(params))
            if status != 0:
                partial.unlink(missing_ok=True)
                raise RuntimeError(f"llama_model_quantize {f32} -> {name} failed (status {status}): "
                                   f"{' '.join(_errors[-3:]) or 'no error logged'}")
            partial.rename(path)
            seconds[name] = time.perf_counter() - started
        files[name] = path
    log.info("llama.cpp files in %s (%s)", out, ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in
                                                           ((k, p.stat().st_size) for k, p in files.items())))
    return {"files": {k: str(v) for k, v in files.items()}, "seconds": seconds,
            "bytes": {k: v.stat().st_size for k, v in files.items()}}


# llama.cpp's OpenMP threads spin while they wait for work. On a shared machine whose cores other jobs also use, a
# spinning thread takes the core its own process's worker needs: measured here with other jobs running, Q8_0 decoded
# 1.3 tokens/s spinning and 20 passive. Passive waiting is the setting that favours llama.cpp on such a machine.
ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


class LlamaCpp:
    """Greedy generation through llama.cpp's C API (``llama_decode`` on a batch with one sequence id per row, the
    argmax of each row's logits in numpy, as ``engines.greedy`` takes it for ours). The high-level ``Llama`` class
    generates one sequence at a time, so batches need this level anyway.

    One context per batch size (``n_seq_max`` rows of ``n_ctx_per_row`` tokens each), made on first use and reused
    with its memory cleared, so a batch-1 run holds a batch-1 context only."""

    def __init__(self, path: Path, threads: int, n_ctx_per_row: int):
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        _keep_errors_only(llama_cpp)
        params = llama_cpp.llama_model_default_params()
        # No extra buffer types (AMX, weight repacking): on a CPU with AMX, llama-cpp-python 0.3.36 built with
        # GGML_NATIVE dies of an illegal instruction (tileloadd) in its AMX kernels on the first Q8_0 or Q4_K
        # product; llama.cpp then runs its plain AVX-512/AVX2 kernels, somewhat slower than with repacked weights.
        params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}: {' '.join(_errors[-3:]) or 'no error logged'}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.threads = threads
        self.n_ctx_per_row = n_ctx_per_row
        self.contexts: dict[int, tuple] = {}  # rows: (context, its llama_batch, the tokens one decode call takes)

    def _context(self, batch: int, tokens: int):
        lib = self.lib
        # A context made for a shorter prompt (the warm-up's) takes fewer tokens per call than this one: made anew.
        if batch not in self.contexts or self.contexts[batch][2] < tokens:
            for ctx, llama_batch, _ in self.contexts.values():  # one context at a time: its KV cache is resident
                lib.llama_batch_free(llama_batch)
                lib.llama_free(ctx)
            self.contexts.clear()
            params = lib.llama_context_default_params()
            params.n_ctx = batch * self.n_ctx_per_row
            params.n_batch = max(tokens, 512)
            params.n_seq_max = batch
            params.n_threads = params.n_threads_batch = self.threads
            ctx = lib.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context of {batch} x {self.n_ctx_per_row} tokens")
            self.contexts[batch] = (ctx, lib.llama_batch_init(max(tokens, 512), 0, batch), max(tokens, 512))
        ctx, llama_batch, _ = self.contexts[batch]
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        return ctx, llama_batch

    def generate(self, prompts: np.ndarray, new_tokens: int, on_token) -> list[list[int]]:
        """Greedy ``new_tokens`` after each row of ``prompts`` (equal lengths), ``on_token`` called per token."""
        lib = self.lib
        rows, length = prompts.shape
        ctx, batch = self._context(rows, rows * length)
        entries = [(row, position, int(prompts[row, position]), position == length - 1)
                   for row in range(rows) for position in range(length)]
        out: list[list[int]] = [[] for _ in range(rows)]
        for i in range(new_tokens):
            batch.n_tokens = len(entries)
            for j, (row, position, token, wants_logits) in enumerate(entries):
                batch.token[j] = token
                batch.pos[j] = position
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = row
                batch.logits[j] = wants_logits
            status = lib.llama_decode(ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed (status {status})")
            # The outputs come in batch order: one row of logits per row of the prompt batch.
            logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(rows, self.n_vocab))
            tokens = logits.argmax(-1)
            on_token(tokens)
            for row, token in enumerate(tokens):
                out[row].append(int(token))
            position = length + i
            entries = [(row, position, int(tokens[row]), True) for row in range(rows)]
        return out

    def close(self) -> None:
        for ctx, llama_batch, _ in self.contexts.values():
            self.lib.llama_batch_free(llama_batch)
            self.lib.llama_free(ctx)
        self.contexts.clear()
        self.lib.llama_model_free(self.model)


# llama.cpp logs every load and quantization at length to stderr; the benchmark's own log says what ran. Its errors
# are kept, to say why a file did not load. The callback lives at module level: ctypes callbacks must outlive every
# call into the library that may log.
_GGML_LOG_LEVEL_ERROR = 4
_errors: list[str] = []
_log_callback = None


def _keep_errors_only(llama_cpp) -> None:
    global _log_callback
    if _log_callback is None:
        def keep(level, text, user_data):
            if level == _GGML_LOG_LEVEL_ERROR:
                _errors.append(text.decode(errors="replace").strip())

        _log_callback = llama_cpp.llama_log_callback(keep)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
