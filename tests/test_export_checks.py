"""`python -m export` refuses a checkpoint whose weights are not finite, or whose config.json does not match its
tensors, with one line naming the file and tensor, before writing anything; the config mismatch in seconds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from reference import resolve_checkpoint
from tests.conftest import REPO


@pytest.fixture
def tiny_copy(tmp_path):
    folder = tmp_path / "models" / "tiny"
    shutil.copytree(resolve_checkpoint("tiny"), folder)
    return folder


def run_export(folder, out, *extra):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "export", "--model", str(folder), "--out", str(out), "--engine",
                             "onnx", "--max-batch", "2", "--max-context", "64", *extra], cwd=REPO,
                            capture_output=True, text=True)
    return result, time.perf_counter() - started


@pytest.mark.parametrize("extra", [(), ("--skip-verify",)])  # the streamed weights are checked as they are written
def test_a_nan_weight_is_refused_naming_the_tensor_and_nothing_is_written(tiny_copy, tmp_path, extra):
    """Before, NaN in the reference and NaN in the engine compared equal and the artifact shipped."""
    weights = tiny_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.self_attn.v_proj.weight"][7, 3] = float("nan")
    save_file(tensors, weights)
    result, _ = run_export(tiny_copy, tmp_path / "out", *extra)
    assert result.returncode == 2, result.stderr
    assert (f"error: {weights}: tensor model.layers.1.self_attn.v_proj.weight holds 1 NaN and 0 infinite value(s) "
            "in its stored float32") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["models"]


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": 100000}, "missing tensor(s) model.layers.2.input_layernorm.weight"),
    ({"hidden_size": 256}, "tensor model.embed_tokens.weight has shape (1024, 128), config.json implies (1024, 256) "
                           "= (vocab_size, hidden_size)"),
])
def test_a_config_unlike_the_checkpoint_is_refused_in_seconds(tiny_copy, tmp_path, change, message):
    config = tiny_copy / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | change))
    result, seconds = run_export(tiny_copy, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "config.json from the same checkpoint?" in result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < 30, f"took {seconds:.1f} s"
    assert not (tmp_path / "out").exists()
