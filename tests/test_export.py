"""`python -m export`: the graph, the ONNX Runtime engine, the artifact folder, parity, and refused input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from engines import Artifact, ArtifactError, open_engine
from engines.onnxruntime import OnnxRuntimeEngine, cuda_available
from export import build as build_module
from export import parity
from export.build import ExportError, ExportOptions, build
from reference import load_model, resolve_checkpoint
from tests.conftest import CONFIGS, REPO, save_hf_checkpoint


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO, capture_output=True, text=True)


def exportable_checkpoint(folder, **overrides):
    """A transformers checkpoint plus what serving needs besides it: a word-level tokenizer with one token per id
    of its vocabulary (save_pretrained of a model writes none) and the tiny model's tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = save_hf_checkpoint(folder, **overrides)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    shutil.copyfile(REPO / "reference" / "tiny" / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


@pytest.fixture
def tiny_copy(tmp_path):
    """The built-in tiny checkpoint, copied where a test may break it."""
    folder = tmp_path / "models" / "tiny"
    shutil.copytree(resolve_checkpoint("tiny"), folder)
    return folder


def folder_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_artifact_is_complete_and_verified(tiny_artifact):
    artifact = Artifact.open(tiny_artifact)  # checks every file's sha256
    m = artifact.manifest
    assert set(m.files) == {"model.onnx", "model.onnx.data", "model.gqa.onnx", "config.json", "tokenizer.json",
                            "tokenizer_config.json", "generation_config.json"}
    assert m.parity.reports["onnxruntime-cpu"]["passed"]
    assert m.parity.reports["onnxruntime-cpu"]["onnx_file"] == m.graph.onnxruntime_cpu_file == "model.gqa.onnx"
    assert m.graph.inputs["past_key_0"] == {"shape": ["batch", 2, 256, 32], "dtype": "float32"}
    assert not m.tensorrt.built and m.tensorrt.reason == "--engine onnx"
    assert m.source.files["model.safetensors"] and m.tools["onnxruntime"]
    assert not [p for p in tiny_artifact.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_graph_has_the_form_tensorrt_takes(tiny_artifact):
    graph = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    layers = 2
    assert ops["TensorScatter"] == 2 * layers and ops["Attention"] == layers
    assert ops["RotaryEmbedding"] == 2 * layers and ops["LayerNormalization"] >= layers + 1
    for node in graph.node:
        if node.op_type == "Attention":  # single output, no past inputs, an explicit boolean mask
            assert len(node.output) == 1 and len(node.input) == 4
        if node.op_type == "RotaryEmbedding":
            assert {a.name: a.i for a in node.attribute}["interleaved"] == 1
    opset = {o.domain: o.version for o in onnx.load(str(tiny_artifact / "model.onnx"),
                                                    load_external_data=False).opset_import}
    assert opset[""] == 24


def test_artifact_refuses_a_changed_or_missing_file(tiny_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (copy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx.data: sha256 differs"):
        Artifact.open(copy)
    shutil.copyfile(tiny_artifact / "model.onnx.data", copy / "model.onnx.data")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json: listed in manifest.json but missing"):
        Artifact.open(copy)


@pytest.fixture(scope="module")
def tiny_engine(tiny_artifact):
    artifact = Artifact.open(tiny_artifact)
    return open_engine(artifact, "onnxruntime-cpu"), load_model("tiny")[0]


def test_late_joiner_rows_equal_each_row_alone(tiny_engine):
    """Rows at different positions in one step (a sequence joining a running batch) equal each row alone."""
    engine, reference = tiny_engine
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 1024, 20).tolist(), rng.integers(0, 1024, 6).tolist()
    state = engine.allocate(2)
    # row 0 prefills 19 tokens; row 1 is idle (one pad token at slot 0)
    engine.step(state, parity.right_pad([a[:19], [0]]), np.array([0, 0]), np.array([18, 0]))
    # one step: row 0 decodes its 20th token while row 1 prefills 6 tokens from position 0
    logits = engine.step(state, parity.right_pad([a[19:], b]), np.array([19, 0]), np.array([0, 5]))
    with torch.no_grad():
        alone_a = reference(torch.tensor([a]))[0, -1].numpy()
        alone_b = reference(torch.tensor([b]))[0, -1].numpy()
    assert np.abs(logits[0] - alone_a).max() <= 1e-4
    assert np.abs(logits[1] - alone_b).max() <= 1e-4


def test_decode_updates_the_cache_in_place(tiny_engine):
    """IO binding hands ONNX Runtime the same buffer as past and present: no copy of the whole cache per step."""
    engine, _ = tiny_engine
    state = engine.allocate(1)
    before = state.caches[0][0]
    buffer = before.numpy()  # the CPU OrtValue wraps this numpy array
    engine.step(state, np.array([[7, 8, 9]]), np.array([0]), np.array([2]))
    assert state.caches[0][0] is before
    assert np.abs(buffer[0, :, :3]).max() > 0 and np.abs(buffer[0, :, 3:]).max() == 0


def test_step_refuses_bad_arguments(tiny_engine):
    engine, _ = tiny_engine
    state = engine.allocate(2)
    with pytest.raises(ValueError, match="exceed the artifact's max_context 256"):
        engine.step(state, np.zeros((2, 4)), np.array([0, 253]), np.array([3, 3]))
    with pytest.raises(ValueError, match="token id outside"):
        engine.step(state, np.full((2, 1), 5000), np.array([0, 0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="batch 9 outside"):
        engine.allocate(9)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_export_of_transformers_checkpoints_passes_parity(tmp_path, name, dtype):
    folder = exportable_checkpoint(tmp_path / "ckpt", **CONFIGS[name])
    out = build(ExportOptions(model=str(folder), out=tmp_path / "art", dtype=dtype, max_batch=3, max_context=64,
                              engine="onnx"))
    report = Artifact.open(out).manifest.parity.reports["onnxruntime-cpu"]
    logits = next(r for r in report["rows"] if r["output"] == "logits")
    print(f"\n{name} {dtype}: logits max abs {logits['max_abs']:.3e} (rel {logits['max_rel']:.3e}), "
          f"greedy equal {report['greedy_tokens_equal']}")
    assert report["passed"]
    if dtype == "float32":
        assert logits["max_abs"] <= 1e-4


def test_failed_parity_writes_nothing_and_keeps_the_previous_artifact(tmp_path, monkeypatch):
    out = build(ExportOptions(model="tiny", out=tmp_path / "art", max_batch=2, max_context=64, engine="onnx"))
    previous = (out / "manifest.json").read_text()
    impossible = parity.Tolerance(logits_max_abs=0.0, cache_max_abs=0.0, top1_agreement=1.0,
                                  greedy_must_match=True)
    monkeypatch.setitem(parity.TOLERANCES, "float32", impossible)
    with pytest.raises(ExportError, match="onnxruntime-cpu parity check failed .*nothing was written"):
        build(ExportOptions(model="tiny", out=out, max_batch=2, max_context=64, engine="onnx"))
    assert (out / "manifest.json").read_text() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_skip_verify_is_recorded(tmp_path):
    out = build(ExportOptions(model="tiny", out=tmp_path / "art", max_batch=1, max_context=32, engine="onnx",
                              verify=False))
    parity = Artifact.open(out).manifest.parity
    assert parity.skipped == "--skip-verify" and not parity.reports


def test_parity_command_remeasures_an_artifact(tiny_artifact):
    result = subprocess.run([sys.executable, "-m", "export.parity", str(tiny_artifact), "--backend",
                             "onnxruntime"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "logits" in result.stdout and "overall: PASS" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "command-x"], "not a preset"),
    (["--model", "tiny", "--max-context", "100000"], "--max-context 100000 exceeds the model's context of 8192"),
    (["--model", "tiny", "--max-batch", "0"], "--max-batch 0"),
    (["--model", "tiny", "--max-batch", "5000", "--memory-budget", "1TB"],
     "max_batch 5000: must be an integer in [1, 4096]"),
])
def test_bad_input_gets_one_clear_line(args, message):
    result = run_export(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = run_export("--model", "tiny", "--out", str(target))
    assert result.returncode == 2 and "is a file" in result.stderr


def test_not_a_cohere_checkpoint_is_refused(tmp_path):
    folder = exportable_checkpoint(tmp_path / "ckpt", **CONFIGS["mha-tied"])
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    result = run_export("--model", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "'model_type' = 'llama'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_ort_engine_refuses_a_broken_graph(tmp_path, tiny_artifact):
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    from engines import EngineError

    with pytest.raises(EngineError, match="ONNX Runtime cannot load it"):
        OnnxRuntimeEngine(tmp_path / "model.onnx", Artifact.open(tiny_artifact).spec)


def test_tensorrt_export_builds_a_plan_and_says_why_it_is_not_verified(tmp_path):
    """With only TensorRT-RTX installed (CI), --engine tensorrt builds an offline plan into the artifact."""
    pytest.importorskip("tensorrt_rtx")
    out = build(ExportOptions(model="tiny", out=tmp_path / "art", dtype="float16", max_batch=2, max_context=64,
                              engine="tensorrt"))
    m = Artifact.open(out).manifest
    plan = m.tensorrt.plan
    assert m.tensorrt.built and m.files["model.plan"].sha256 == plan.plan_sha256
    assert [p["name"] for p in plan.profiles] == ["prefill", "decode"]
    assert m.parity.reports["onnxruntime-cpu"]["passed"]
    assert "tensorrt" not in m.parity.reports and "GPU" in m.parity.unmeasured["tensorrt"]


def test_no_disk_space_is_refused_before_writing(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ExportError, match="not enough disk space in .*0.0 GB free"):
        build(ExportOptions(model="tiny", out=tmp_path / "art", engine="onnx"))
    assert not (tmp_path / "art").exists()


def test_help_names_the_presets_and_examples():
    result = run_export("--help")
    assert result.returncode == 0
    assert "command-r-plus" in result.stdout and "--max-context" in result.stdout and "examples" in result.stdout


def test_a_step_over_the_first_rows_leaves_the_others_alone(tiny_engine):
    """A step may run the first k rows of a state: what a half-empty batch costs is what its live rows cost."""
    engine, reference = tiny_engine
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 1024, 7).tolist(), rng.integers(0, 1024, 4).tolist()
    state = engine.allocate(4)
    first = engine.step(state, parity.right_pad([a[:4], b]), np.array([0, 0]), np.array([3, 3]))  # rows 0-1
    last = engine.step(state, np.array([a[4:]]), np.array([4]), np.array([2]))  # row 0 alone
    with torch.no_grad():
        assert np.abs(last[0] - reference(torch.tensor([a]))[0, -1].numpy()).max() <= 1e-4
        assert np.abs(first[1] - reference(torch.tensor([b]))[0, -1].numpy()).max() <= 1e-4
    keys = engine.read_cache(state)[0][0]
    assert last.shape == (1, 1024) and np.abs(keys[2:]).max() == 0  # rows 2-3 never written


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(),
                    reason="ONNX Runtime's CUDA execution provider is not available (needs onnxruntime-gpu and a GPU)")
def test_cuda_execution_provider_passes_parity(tiny_artifact):
    engine = open_engine(Artifact.open(tiny_artifact), "onnxruntime-cuda")
    report = parity.measure(load_model("tiny")[0], engine)
    print(parity.format_table(report))
    assert engine.backend == "onnxruntime-cuda" and report["passed"]


# ------------------------------------------------------------------------------------ --out and what it deletes


@pytest.mark.parametrize("where", [".", "..", "../.."])
def test_out_that_holds_the_checkpoint_is_refused_and_the_checkpoint_kept(tiny_copy, where):
    before = folder_digest(tiny_copy)
    result = run_export("--model", str(tiny_copy), "--out", str(tiny_copy / where), "--engine", "onnx",
                        "--max-context", "32", "--skip-verify")
    assert result.returncode == 2 and "holds the checkpoint being exported" in result.stderr, result.stderr
    assert folder_digest(tiny_copy) == before


def test_a_folder_that_is_no_artifact_is_not_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_export("--model", "tiny", "--out", str(out), "--engine", "onnx", "--max-context", "32",
                        "--skip-verify")
    assert result.returncode == 2 and "not empty and not an artifact" in result.stderr, result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_an_artifact_holding_files_of_its_own_is_not_replaced(tmp_path):
    options = ExportOptions(model="tiny", out=tmp_path / "art", max_batch=1, max_context=32, engine="onnx",
                            verify=False)
    out = build(options)
    (out / "my-notes.md").write_text("keep me")
    with pytest.raises(ExportError, match=r"files its manifest does not list \(my-notes.md\)"):
        build(options)
    assert (out / "my-notes.md").read_text() == "keep me"


def test_an_empty_folder_may_be_the_out_folder(tmp_path):
    (tmp_path / "art").mkdir()
    out = build(ExportOptions(model="tiny", out=tmp_path / "art", max_batch=1, max_context=32, engine="onnx",
                              verify=False))
    Artifact.open(out)


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "from-a").write_text("a")
    (b / "from-b").write_text("b")
    if not build_module._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert [p.name for p in a.iterdir()] == ["from-b"] and [p.name for p in b.iterdir()] == ["from-a"]


@pytest.mark.parametrize("exchange", ["renameat2", "fallback"])
def test_re_export_replaces_the_artifact_and_removes_only_the_old_one(tmp_path, monkeypatch, exchange):
    options = ExportOptions(model="tiny", out=tmp_path / "art", max_batch=1, max_context=32, engine="onnx",
                            verify=False)
    out = build(options)
    old_inode = out.stat().st_ino
    swaps = []
    real = build_module._exchange
    monkeypatch.setattr(build_module, "_exchange",
                        lambda a, b: swaps.append((a, b)) or (real(a, b) if exchange == "renameat2" else False))
    assert build(dataclasses.replace(options, max_batch=2)) == out
    assert len(swaps) == 1 and swaps[0][1] == out
    assert out.stat().st_ino != old_inode and Artifact.open(out).spec.max_batch == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ------------------------------------------------------------------------------------- interrupted exports


def test_sigterm_mid_export_leaves_nothing_behind(tmp_path):
    out = tmp_path / "art"
    process = subprocess.Popen([sys.executable, "-m", "export", "--model", "tiny", "--out", str(out), "--engine",
                                "onnx", "--max-context", "64"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.tmp-*")):
        assert process.poll() is None and time.monotonic() < deadline, "export ended before its temporary folder"
        time.sleep(0.01)
    time.sleep(0.3)  # well inside the export: loading, tracing
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_folders_of_dead_exports_are_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale = tmp_path / f".art.tmp-{dead_pid}-abc123"
    running = tmp_path / f".art.tmp-{os.getpid()}-def456"  # a live process: maybe an export running now
    not_ours = [tmp_path / ".art.tmp-notes", tmp_path / f".other.tmp-{dead_pid}-abc123"]
    for folder in (stale, running, *not_ours):
        folder.mkdir()
        (folder / "model.onnx").write_text("x")
    build(ExportOptions(model="tiny", out=tmp_path / "art", max_batch=1, max_context=32, engine="onnx",
                        verify=False))
    assert not stale.exists() and running.exists() and all(p.exists() for p in not_ours)


# ----------------------------------------------------------------------------- what serve needs, checked now


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _int8_embedding(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(torch.int8)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json; serving the artifact needs it"),
    (lambda f: (f / "tokenizer.json").write_text("{not json"), "tokenizer.json: the tokenizers library cannot load"),
    (lambda f: (f / "tokenizer_config.json").unlink(), "no tokenizer_config.json"),
    (lambda f: (f / "tokenizer_config.json").write_text("{not json"), "tokenizer_config.json: not valid JSON"),
    (lambda f: (f / "tokenizer_config.json").write_text("[1, 2]"), "tokenizer_config.json: expected a JSON object"),
    (lambda f: _edit_json(f / "tokenizer_config.json", chat_template=7), "tokenizer_config.json: chat_template"),
    (lambda f: (f / "generation_config.json").write_text("{not json"), "generation_config.json: not valid JSON"),
    (lambda f: _edit_json(f / "generation_config.json", eos_token_id=99999),
     "generation_config.json: eos_token_id 99999: must be a token id in [0, 1024)"),
    (lambda f: _edit_json(f / "generation_config.json", eos_token_id=[9, -1]), "eos_token_id [9, -1]"),
    (lambda f: _edit_json(f / "generation_config.json", do_sample=True, top_p=2), "top_p 2: must lie in (0, 1]"),
    (lambda f: _edit_json(f / "generation_config.json", temperature="hot"), "temperature 'hot'"),
    (lambda f: _edit_json(f / "generation_config.json", max_new_tokens=0), "max_new_tokens 0"),
    (lambda f: _edit_json(f / "config.json", eos_token_id=5000) or (f / "generation_config.json").unlink(),
     "config.json: eos_token_id 5000"),
    (_int8_embedding, "tensor model.embed_tokens.weight is stored as I8; .*quantized checkpoints are not supported"),
])
def test_checkpoint_files_serve_cannot_use_are_refused_by_name(tiny_copy, tmp_path, damage, message):
    damage(tiny_copy)
    result = run_export("--model", str(tiny_copy), "--out", str(tmp_path / "art"), "--engine", "onnx",
                        "--max-context", "32")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.search(message if message.startswith("tensor") else re.escape(message), result.stderr), result.stderr
    assert not (tmp_path / "art").exists()


def test_a_tokenizer_too_large_for_the_model_is_refused(tmp_path):
    folder = exportable_checkpoint(tmp_path / "ckpt", **CONFIGS["mha-tied"])
    _edit_json(folder / "config.json", vocab_size=100)
    with pytest.raises(ExportError, match="tokenizer.json: has token id 210, outside the model's vocab_size 100"):
        build(ExportOptions(model=str(folder), out=tmp_path / "art", engine="onnx", max_context=32))


def test_a_symlink_out_of_the_checkpoint_is_refused(tiny_copy, tmp_path):
    outside = tmp_path / "elsewhere" / "tokenizer.json"
    outside.parent.mkdir()
    (tiny_copy / "tokenizer.json").rename(outside)
    (tiny_copy / "tokenizer.json").symlink_to(outside)
    result = run_export("--model", str(tiny_copy), "--out", str(tmp_path / "art"), "--engine", "onnx",
                        "--max-context", "32")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"tokenizer.json: a symlink to {outside}, outside the checkpoint folder" in result.stderr


def test_a_symlink_inside_the_checkpoint_is_followed(tiny_copy, tmp_path):
    (tiny_copy / "blobs").mkdir()
    (tiny_copy / "tokenizer.json").rename(tiny_copy / "blobs" / "abc")
    (tiny_copy / "tokenizer.json").symlink_to("blobs/abc")
    out = build(ExportOptions(model=str(tiny_copy), out=tmp_path / "art", max_batch=1, max_context=32,
                              engine="onnx", verify=False))
    assert not (out / "tokenizer.json").is_symlink() and Artifact.open(out)


def test_a_folder_put_in_place_after_the_check_is_kept(tmp_path, monkeypatch):
    """Between the check of --out and the swap another process replaces the folder: what it put there survives."""
    options = ExportOptions(model="tiny", out=tmp_path / "art", max_batch=1, max_context=32, engine="onnx",
                            verify=False)
    out = build(options)
    real = build_module._check_out

    def check_then_race(out, checkpoint):
        checked = real(out, checkpoint)
        shutil.rmtree(out)  # the new folder may get the deleted one's inode number: export must still tell them apart
        out.mkdir()
        (out / "theirs.txt").write_text("not ours")
        return checked

    monkeypatch.setattr(build_module, "_check_out", check_then_race)
    build(options)
    [kept] = tmp_path.glob(".art.replaced-*")
    assert (kept / "theirs.txt").read_text() == "not ours" and Artifact.open(out)


def test_parity_opens_the_finished_artifact_as_a_server_does(tmp_path, monkeypatch):
    """Export chooses no engine itself: it opens the temporary artifact through Artifact and open_engine."""
    opened = []

    def recording_open_engine(artifact, backend="auto"):
        opened.append((artifact.folder, backend, set(artifact.manifest.files)))
        return open_engine(artifact, backend)

    monkeypatch.setattr(build_module, "open_engine", recording_open_engine)
    out = build(ExportOptions(model="tiny", out=tmp_path / "art", max_batch=1, max_context=32, engine="onnx"))
    [(folder, backend, files)] = opened
    assert folder.name.startswith(".art.tmp-") and backend == "onnxruntime"
    assert files == set(Artifact.open(out).manifest.files)
    assert Artifact.open(out).manifest.parity.reports["onnxruntime-cpu"]["passed"]
