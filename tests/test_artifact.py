"""A manifest is input like any other: hostile or inconsistent ones are an ArtifactError naming the field, on open."""

from __future__ import annotations

import json
import shutil

import pytest

from engines import Artifact, ArtifactError, EngineError, open_engine


@pytest.fixture
def copy(tiny_artifact, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, folder)
    return folder


def edit_manifest(folder, edit):
    raw = json.loads((folder / "manifest.json").read_text())
    edit(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))


@pytest.fixture
def outside(tmp_path):
    """A file beside the artifact, of a size that must not show up in any error."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 12345)
    return secret


@pytest.mark.parametrize("name", ["../secret", "{outside}", "sub/../../secret", ".."])
def test_file_entries_outside_the_folder_are_refused_unread(copy, outside, name):
    name = name.format(outside=outside)
    edit_manifest(copy, lambda m: m["files"].update({name: {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(ArtifactError, match="files: .* is not a plain file name") as e:
        Artifact.open(copy)
    assert "12345" not in str(e.value)


def test_an_absolute_graph_file_is_refused(copy, outside):
    edit_manifest(copy, lambda m: m["graph"].update(onnx_file=str(outside)))
    with pytest.raises(ArtifactError, match="graph.onnx_file: .* is not a plain file name"):
        Artifact.open(copy)


def _delete(path):
    def edit(m):
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        del m[last]
    return edit


@pytest.mark.parametrize("edit, message", [
    (_delete("graph.spec.num_layers"), r"graph.spec.num_layers is missing"),
    (_delete("files"), r"manifest.json.files is missing"),
    (lambda m: m["graph"]["spec"].update(colour="blue"), r"graph.spec: unknown field\(s\) colour"),
    (lambda m: m.update(graph=[]), r"graph: expected an object, found list"),
    (lambda m: m["files"]["config.json"].update(bytes="12"), r"files.config.json.bytes: expected an integer"),
    (lambda m: m["graph"]["spec"].update(max_batch=True), r"graph.spec.max_batch: expected an integer"),
    (lambda m: m["graph"]["spec"].update(dtype="int8"), r"graph.spec: dtype 'int8'"),
    (lambda m: m["parity"].update(reports=7), r"parity.reports: expected an object"),
])
def test_malformed_manifests_name_the_field(copy, edit, message):
    edit_manifest(copy, edit)
    with pytest.raises(ArtifactError, match=message):
        Artifact.open(copy)


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_batch",
                                   "max_context"])
@pytest.mark.parametrize("value", [10**12, 0, -1])
def test_absurd_sizes_are_refused_before_anything_allocates(copy, field, value):
    edit_manifest(copy, lambda m: m["graph"]["spec"].update({field: value}))
    with pytest.raises(ArtifactError, match=f"graph.spec: {field} {value}: must be an integer in"):
        Artifact.open(copy)


def test_a_graph_section_that_disagrees_with_the_config_is_refused(copy):
    edit_manifest(copy, lambda m: m["config"].update(num_hidden_layers=3))
    with pytest.raises(ArtifactError, match="graph.spec.num_layers 2 disagrees with config.num_hidden_layers 3"):
        Artifact.open(copy)
    edit_manifest(copy, lambda m: m["config"].update(num_hidden_layers=2, hidden_size=256))
    with pytest.raises(ArtifactError, match="graph.spec.head_dim 32 disagrees with config.hidden_size 256"):
        Artifact.open(copy)


def test_declared_io_that_disagrees_with_the_spec_is_refused(copy):
    edit_manifest(copy, lambda m: m["graph"]["inputs"]["past_key_1"].update(shape=["batch", 2, 9999, 32]))
    with pytest.raises(ArtifactError, match=r"graph.inputs.past_key_1 is .*9999.*the graph's spec declares"):
        Artifact.open(copy)
    edit_manifest(copy, lambda m: m["graph"]["inputs"].pop("past_key_1"))
    with pytest.raises(ArtifactError, match=r"graph.inputs.past_key_1 is None"):
        Artifact.open(copy)


def _respec(**changes):
    """A manifest consistent in itself (spec, IO, config) but describing another graph than model.onnx."""
    from engines.base import GraphSpec

    def edit(m):
        spec = GraphSpec(**{**m["graph"]["spec"], **changes})
        m["graph"].update(spec=spec.to_dict(), **spec.io())
        m["config"].update(num_hidden_layers=spec.num_layers, vocab_size=spec.vocab_size)
    return edit


@pytest.mark.parametrize("changes, message", [
    (dict(num_layers=3), r"inputs differ from the artifact's spec .*missing: past_key_2"),
    (dict(max_context=128), r"input past_key_0 is tensor\(float\) \['batch', 2, 256, 32\]; .*declares float32 "
                            r"\['batch', 2, 128, 32\]"),
    (dict(dtype="float16"), r"input past_key_0 is tensor\(float\) .*declares float16"),
    (dict(vocab_size=2048), r"output logits is tensor\(float\) \['batch', 1024\]; .*declares float32 "
                            r"\['batch', 2048\]"),
])
def test_a_graph_section_that_disagrees_with_the_onnx_graph_is_refused_on_open(copy, changes, message):
    edit_manifest(copy, _respec(**changes))
    artifact = Artifact.open(copy)  # consistent in itself: only the graph can tell
    with pytest.raises(EngineError, match=message):
        open_engine(artifact, "onnxruntime-cpu")


def test_a_symlinked_manifest_is_refused(copy, tmp_path):
    moved = tmp_path / "elsewhere.json"
    (copy / "manifest.json").rename(moved)
    (copy / "manifest.json").symlink_to(moved)
    with pytest.raises(ArtifactError, match="manifest.json: a symlink"):
        Artifact.open(copy)


def test_the_real_artifact_opens_and_runs(copy):
    with open_engine(Artifact.open(copy), "onnxruntime-cpu") as engine:
        assert engine.spec.num_layers == 2


def _with_plan(**fields):
    """A tensorrt section as export writes one, listing files that exist in the folder unless told otherwise."""
    def edit(m):
        m["tensorrt"] = {"plan": {
            "module": "tensorrt_rtx", "version": "1.7", "gpu": None, "compute_capability_targets": None,
            "profiles": [], "native_layers": {}, "attention_decomposable": True, "plan_file": "config.json",
            "plan_sha256": m["files"]["config.json"]["sha256"], "build_log_file": "tokenizer.json",
            "timing_cache_file": None, "build_seconds": 1.0, **fields}, "reason": None}
    return edit


@pytest.mark.parametrize("field", ["plan_file", "build_log_file", "timing_cache_file"])
@pytest.mark.parametrize("name", ["../secret", "{outside}"])
def test_plan_files_outside_the_folder_are_refused(copy, outside, field, name):
    edit_manifest(copy, _with_plan(**{field: name.format(outside=outside)}))
    with pytest.raises(ArtifactError, match=f"tensorrt.plan.{field}: .* is not a plain file name") as e:
        Artifact.open(copy)
    assert "12345" not in str(e.value)


def test_plan_files_must_be_listed(copy):
    edit_manifest(copy, _with_plan(build_log_file="build.log"))
    with pytest.raises(ArtifactError, match="tensorrt.plan.build_log_file names 'build.log', which the files"):
        Artifact.open(copy)
    edit_manifest(copy, _with_plan())
    assert Artifact.open(copy).manifest.tensorrt.built


@pytest.mark.parametrize("text", ['{"format_version": 2, "created": ' + "9" * 5000 + "}", "[" * 100000, "\xff\xfe"])
def test_manifests_json_cannot_parse_are_an_artifact_error(copy, text):
    (copy / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match="manifest.json: not valid JSON"):
        Artifact.open(copy)
