"""Issue 11's small debts, each pinned: one logging set-up for every command line with no import circle, a
benchmark that never drops a runner silently, and an exporter that writes its weights where the manifest says."""

from __future__ import annotations

import logging
import subprocess
import sys

import onnx
import pytest
import torch

from engines.base import GraphSpec
from engines.cli import configure_logging
from reference.checkpoint import tiny_model
from reference.presets import PRESETS
from tests.conftest import REPO


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_parity_cli_does_not_import_the_export_cli():
    """The circle export/__main__ -> build -> parity -> __main__ is gone: parity's CLI stands on its own."""
    done = run_python("import sys; from export import parity; code = parity.main(['/nonexistent/artifact']); "
                      "assert code == 2, code; assert 'export.__main__' not in sys.modules, 'imported'")
    assert done.returncode == 0, done.stderr
    assert "error: " in done.stderr and "/nonexistent/artifact" in done.stderr


def test_the_logging_helper_loads_no_torch():
    """``python -m serve`` uses it and must not pay for (or need) torch."""
    done = run_python("import sys, engines.cli; assert 'torch' not in sys.modules")
    assert done.returncode == 0, done.stderr


def test_configure_logging_sets_only_the_named_loggers(monkeypatch):
    for name in ("cohere-test-a", "cohere-test-b", "cohere-test-other"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    configure_logging(verbose=False, loggers=("cohere-test-a",), level=logging.WARNING)
    configure_logging(verbose=True, loggers=("cohere-test-b",))
    assert logging.getLogger("cohere-test-a").level == logging.WARNING
    assert logging.getLogger("cohere-test-b").level == logging.DEBUG
    assert logging.getLogger("cohere-test-other").level == logging.NOTSET


def test_bench_refuses_to_run_without_serve_rather_than_dropping_it(tiny_artifact, monkeypatch):
    from bench import checkpoints
    from bench.__main__ import make_runners

    made = make_runners("tiny", checkpoints.checkpoint("tiny"), tiny_artifact, with_transformers=False)
    assert [r.name for r in made] == ["ours", "serve", "reference"]
    monkeypatch.setitem(sys.modules, "serve", None)  # `import serve` now raises ImportError
    with pytest.raises(ImportError, match="serve"):
        make_runners("tiny", checkpoints.checkpoint("tiny"), tiny_artifact, with_transformers=False)


def test_export_writes_its_weights_to_the_data_file_it_names(tmp_path, monkeypatch):
    """The data file's name is the exporter's decision, not torch's: under another name it is written there."""
    from export import onnx_graph

    monkeypatch.setattr(onnx_graph, "DATA_FILE", "weights.bin")
    config = PRESETS["tiny"].config
    spec = GraphSpec(num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                     head_dim=config.head_dim, vocab_size=config.vocab_size, max_batch=2, max_context=32,
                     dtype="float32")
    path = onnx_graph.export_onnx(tiny_model(config).to(torch.float32), spec, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gqa.onnx", "model.onnx", "weights.bin"]
    for graph in (path, tmp_path / "model.gqa.onnx"):  # both graphs read the one data file
        model = onnx.load(str(graph), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"weights.bin"}
