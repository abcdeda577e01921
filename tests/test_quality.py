"""Quality of quantized artifacts against the unquantized reference (export/quality.py), exactness against the
reference with the same dequantized weights, and ``python -m export.parity`` measuring both.

Quantized graphs are written by ``export_onnx`` from the tiny model, as export writes them; the perplexity the
report computes through the engine loop is checked against the plain reference forward (every position of a
window in one call, no cache), an independent path.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from engines.artifact import MANIFEST, sha256_file
from engines.base import GraphSpec
from engines.onnxruntime import OnnxRuntimeEngine
from export import parity, quality
from export.gqa_graph import GQA_ONNX_FILE
from export.onnx_graph import ONNX_FILE, export_onnx
from export.reference_engine import ReferenceEngine
from reference import load_model
from reference.quantize import WeightQuantization, quantized_linear_weights, round_trip_model
from tests.conftest import REPO

MAX_BATCH, MAX_CONTEXT = 4, 256
# Fewer tokens than the default 512, to keep the tests fast; the gates hold at the default too (see QUALITY_TOLERANCES).
WINDOW, MAX_TOKENS = 64, 256


class ScalesOffByTwo(WeightQuantization):
    """A broken quantization: every stored scale is twice the one the integers were rounded against."""

    def quantize(self, w_t: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = super().quantize(w_t, scale_dtype)
        return q, scale * 2


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The reference steps one token at a time; on a shared 2-core machine torch's thread pool spins against other
    processes and a tiny step takes 30x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")[0]


@pytest.fixture(scope="module")
def tokens():
    return quality.default_tokens(REPO / "reference" / "tiny" / "tokenizer.json")


@pytest.fixture(scope="module")
def reference(model):
    return ReferenceEngine(model, MAX_BATCH, MAX_CONTEXT)


def quantized_engine(model, folder, quantization: WeightQuantization, level: int = 1) -> OnnxRuntimeEngine:
    spec = ReferenceEngine(model, MAX_BATCH, MAX_CONTEXT).spec
    export_onnx(model, spec, folder, quantization)
    return OnnxRuntimeEngine(folder / ONNX_FILE, spec, device="cpu", matmul_nbits_accuracy_level=level)


def rows(report: dict) -> dict:
    return {r["output"]: r for r in report["rows"]}


def plain_perplexity(model, windows: list[list[int]]) -> float:
    """exp of the mean NLL of every token after the first of each window, from one cache-less forward each."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            log_p = torch.log_softmax(model(torch.tensor([window]))[0].double(), -1)
            nll -= float(log_p[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum())
            count += len(window) - 1
    return float(np.exp(nll / count))


def test_an_engine_against_itself_agrees_exactly_and_its_perplexity_is_the_plain_forwards(model, tokens):
    # 6 windows through engines of 4 rows: two batches, the second of 2 rows.
    a, b = ReferenceEngine(model, MAX_BATCH, MAX_CONTEXT), ReferenceEngine(model, MAX_BATCH, MAX_CONTEXT)
    text = tokens[:6 * 16]
    report = quality.measure(a, b, text, bits=4, window=16, max_tokens=6 * 16)
    assert report["windows"] == 6 and report["window_tokens"] == 16 and report["scored_positions"] == 6 * 15
    got = rows(report)
    assert got["mean_kl"]["value"] == 0.0 and got["top1_agreement"]["value"] == 1.0
    assert got["perplexity_ratio"]["value"] == 1.0 and report["passed"]
    expected = plain_perplexity(model, [text[i:i + 16] for i in range(0, 6 * 16, 16)])
    assert report["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert report["reference_perplexity"] == report["perplexity"]


def test_windows_are_spread_over_the_text_and_bounded():
    tokens = list(range(1000))
    windows = quality._windows(tokens, 100, 350)
    assert windows.shape == (3, 100) and windows[0, 0] == 0 and windows[-1, -1] == 999  # the start and the end
    assert quality._windows(tokens[:10], 100, 512).tolist() == [tokens[:10]]  # a short text: one window of it all


def test_a_text_of_one_repeated_token_is_warned_about(model, reference, caplog):
    # A word-level tokenizer that knows none of the text's words maps all of it to its unknown token.
    quality.measure(reference, ReferenceEngine(model, MAX_BATCH, MAX_CONTEXT), [0] * 16, 8, window=8, max_tokens=16)
    assert "one token id repeated (0)" in caplog.text


@pytest.mark.parametrize("bits,block_size", [(8, 32), (4, 32), (4, 128)])
def test_round_to_nearest_artifacts_pass_their_quality_gate(model, reference, tokens, tmp_path, bits, block_size):
    with quantized_engine(model, tmp_path, WeightQuantization(bits, block_size)) as engine:
        report = quality.measure(reference, engine, tokens, bits, window=WINDOW, max_tokens=MAX_TOKENS)
    assert report["passed"], quality.format_table(report)
    assert 0 < rows(report)["mean_kl"]["value"]  # quantized weights do change the distribution


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantization_with_scales_off_by_two_fails_the_quality_gate(model, reference, tokens, tmp_path, bits):
    with quantized_engine(model, tmp_path, ScalesOffByTwo(bits, 32)) as engine:
        report = quality.measure(reference, engine, tokens, bits, window=WINDOW, max_tokens=MAX_TOKENS)
    failed = {name for name, row in rows(report).items() if not row["passed"]}
    assert not report["passed"] and failed == {"top1_agreement", "mean_kl", "perplexity_ratio"}, \
        quality.format_table(report)
    assert "FAIL" in quality.format_table(report)


def test_non_finite_logits_fail_the_gate(model, reference, tokens):
    class NaNEngine(ReferenceEngine):
        def _step(self, *args):
            logits = super()._step(*args)
            logits[0, 0] = np.nan
            return logits

    report = quality.measure(reference, NaNEngine(model, MAX_BATCH, MAX_CONTEXT), tokens, 8, window=8, max_tokens=16)
    assert not report["passed"] and report["non_finite"] == 7  # row 0 in each of the 7 steps
    assert "NaN or inf" in quality.format_table(report)


def test_exactness_holds_an_int4_engine_to_the_round_tripped_reference_not_the_unquantized_one(model, tmp_path):
    quantization = WeightQuantization(4, 32)
    round_tripped = copy.deepcopy(model)
    round_trip_model(round_tripped, quantization, torch.float32)
    with quantized_engine(model, tmp_path, quantization, level=1) as engine:
        exact = parity.measure(ReferenceEngine(round_tripped, MAX_BATCH, MAX_CONTEXT), engine)
        against_unquantized = parity.measure(ReferenceEngine(model, MAX_BATCH, MAX_CONTEXT), engine)
    assert exact["passed"], parity.format_table(exact)
    assert not against_unquantized["passed"]
    assert not {r["output"]: r for r in against_unquantized["rows"]}["logits"]["passed"]


# ------------------------------------------------------------------------------------- python -m export.parity


def quantized_artifact(tiny_artifact, model, folder, quantization: WeightQuantization, level: int):
    """The fp32 tiny artifact with its graph replaced by the quantized one and a manifest saying so, as
    ``python -m export --quantize`` writes it (its recorded parity reports stay the fp32 ones: not read here)."""
    shutil.copytree(tiny_artifact, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    export_onnx(model, GraphSpec.from_dict(manifest["graph"]["spec"]), folder, quantization)
    for name in (ONNX_FILE, ONNX_FILE + ".data", GQA_ONNX_FILE):  # the files export_onnx rewrote
        manifest["files"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    manifest["quantization"] = {"method": quantization.method, "bits": quantization.bits,
                                "block_size": quantization.block_size, "scale_dtype": "float32",
                                "weights": quantized_linear_weights(model.config.num_hidden_layers) + ["lm_head"],
                                "onnxruntime_accuracy_level": level}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


@pytest.mark.parametrize("level", [1, 4])
def test_cli_measures_exactness_and_quality_of_a_quantized_artifact(tiny_artifact, model, tmp_path, capsys, level):
    folder = quantized_artifact(tiny_artifact, model, tmp_path / "int4", WeightQuantization(4, 32), level)
    code = parity.main([str(folder), "--backend", "onnxruntime-cpu", "--max-tokens", "128"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "exactness against the reference with the same int4 weights" in out
    assert f"accuracy level {level}" in out
    assert "quality of onnxruntime-cpu (int4, float32)" in out and "perplexity_ratio" in out


def test_cli_fails_a_quantized_artifact_whose_scales_are_off(tiny_artifact, model, tmp_path, capsys):
    folder = quantized_artifact(tiny_artifact, model, tmp_path / "broken", ScalesOffByTwo(4, 32), 1)
    code = parity.main([str(folder), "--backend", "onnxruntime-cpu", "--max-tokens", "128"])
    out = capsys.readouterr().out
    assert code == 1 and "overall: FAIL" in out


def test_cli_perplexity_of_an_unquantized_artifact_on_a_text_file(tiny_artifact, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    code = parity.main([str(tiny_artifact), "--backend", "onnxruntime-cpu", "--perplexity", str(text)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "quality of onnxruntime-cpu (unquantized, float32)" in out
    perplexity_line = next(line for line in out.splitlines() if line.strip().startswith("perplexity "))
    ours, theirs = (float(x) for x in perplexity_line.replace(",", "").split()[1::2])
    assert ours == pytest.approx(theirs, rel=1e-4) and ours > 1  # fp32 artifact: the reference's perplexity


@pytest.mark.parametrize("content,why", [(None, "cannot read it"), (b"", "is empty"), (b" \n\t", "is empty"),
                                         (b"\x89PNG\r\n\x1a\n\0\0\0", "NUL bytes"), (b"caf\xe9", "not UTF-8")])
def test_cli_refuses_a_bad_text_file_naming_it(tiny_artifact, tmp_path, capsys, content, why):
    path = tmp_path / "my text.txt"
    if content is not None:
        path.write_bytes(content)
    code = parity.main([str(tiny_artifact), "--perplexity", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and why in err and "Traceback" not in err
