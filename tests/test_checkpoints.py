"""Config parsing, presets, checkpoint loading and the refusals, each naming what was wrong."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from reference import (PRESETS, CheckpointError, CohereConfig, CohereForCausalLM, ConfigError, ModelNotFoundError,
                       load_model, resolve_checkpoint)
from reference.weights import config_dims, expected_tensors
from tests.conftest import CONFIGS, SHARED, needs_shared, save_hf_checkpoint

BASE = dict(model_type="cohere", vocab_size=256000, hidden_size=8192, intermediate_size=22528,
            num_hidden_layers=40, num_attention_heads=64, num_key_value_heads=8, logit_scale=0.0625,
            rope_theta=8000000)


def test_both_rope_forms_are_read():
    assert CohereConfig.from_dict(BASE).rope_theta == 8000000
    newer = {k: v for k, v in BASE.items() if k != "rope_theta"}
    newer["rope_parameters"] = {"rope_theta": 4000000.0, "rope_type": "default"}
    assert CohereConfig.from_dict(newer).rope_theta == 4000000.0


def test_missing_kv_heads_means_mha_and_eos_list_takes_the_first():
    raw = {k: v for k, v in BASE.items() if k != "num_key_value_heads"} | {"eos_token_id": [255001, 6]}
    config = CohereConfig.from_dict(raw)
    assert config.num_key_value_heads == 64 and config.eos_token_id == 255001


@pytest.mark.parametrize("change, field", [
    ({"model_type": "cohere2"}, "model_type"),
    ({"model_type": "llama"}, "model_type"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_key_value_heads": 7}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"logit_scale": -1}, "logit_scale"),
])
def test_refused_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        CohereConfig.from_dict({**BASE, **change})


@pytest.mark.parametrize("field", ["vocab_size", "logit_scale", "rope_theta"])
def test_missing_fields_are_named(field):
    with pytest.raises(ConfigError, match=f"'{field}' is missing"):
        CohereConfig.from_dict({k: v for k, v in BASE.items() if k != field})


@needs_shared
def test_presets_match_the_published_table():
    """The presets against the per-checkpoint table of COHERE.md section 2 beside the repository, parsed here
    independently of the preset code."""
    table = (SHARED / "COHERE.md").read_text().split("## 2.")[1].split("Notes:")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip().strip("*") for c in line.split("|")[1:-1]]
        if len(cells) > 9 and cells[1] == "cohere":
            rows[cells[0].split(" ")[0]] = cells
    names = {"command-r": "c4ai-command-r-v01", "command-r-08-2024": "c4ai-command-r-08-2024",
             "command-r-plus": "c4ai-command-r-plus", "command-r-plus-08-2024": "c4ai-command-r-plus-08-2024",
             "aya-23-8b": "aya-23-8B", "aya-23-35b": "aya-23-35B", "aya-expanse-8b": "aya-expanse-8b",
             "aya-expanse-32b": "aya-expanse-32b"}
    for preset, row_name in names.items():
        cells, c = rows[row_name], PRESETS[preset].config
        assert PRESETS[preset].hub_id.endswith(row_name)
        assert [c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                c.intermediate_size] == [int(x.split()[0]) for x in cells[2:7]]
        assert c.rope_theta == float(cells[7].replace(",", ""))
        assert c.logit_scale == pytest.approx(float(cells[8].replace("…", "")), rel=1e-3)
        assert c.use_qk_norm == cells[9].startswith("true")
        assert c.vocab_size == 256000 and c.head_dim == 128
        # [mem] rows and the ones with '?' must be flagged as unverified in the code
        if "[mem]" in cells[-1] or "?" in cells[9]:
            assert not PRESETS[preset].verified, preset


def test_sharded_checkpoint_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = save_hf_checkpoint(tmp_path / "one", **CONFIGS["gqa-untied"])
    model = transformers.CohereForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, _ = load_model(folder)
    b, _ = load_model(tmp_path / "sharded")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture
def checkpoint(tmp_path):
    return save_hf_checkpoint(tmp_path / "ckpt", **CONFIGS["gqa-qknorm"])


def _rewrite(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        load_model(checkpoint)


def test_unexpected_tensor_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) model.layers.9.extra.weight"):
        load_model(checkpoint)


def test_wrong_shape_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(3, 64)}))
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(3, 64\)"):
        load_model(checkpoint)


def test_missing_shard_is_named(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = save_hf_checkpoint(tmp_path / "one", **CONFIGS["mha-tied"])
    transformers.CohereForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "sh", max_shard_size="50KB")
    shard = sorted((tmp_path / "sh").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name}, which is missing"):
        load_model(tmp_path / "sh")


def test_not_safetensors_is_named(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(checkpoint)


def test_pickled_checkpoint_is_refused_without_unpickling(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    # a pickle that would run code if loaded: the loader must never open it
    (checkpoint / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    with pytest.raises(CheckpointError, match="pickled weights .*pytorch_model.bin.* refused"):
        load_model(checkpoint)


def test_other_architecture_is_refused(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    raw["model_type"] = "cohere2"
    (checkpoint / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="config.json: config field 'model_type' = 'cohere2'"):
        load_model(checkpoint)


def test_unknown_name_lists_the_presets():
    with pytest.raises(ModelNotFoundError, match="not a preset .*command-r"):
        resolve_checkpoint("command-x")


def test_hub_id_resolves_offline_from_a_local_hf_cache(tmp_path, monkeypatch, checkpoint):
    """A cache laid out as huggingface_hub lays it out: models--owner--name/{refs/main, snapshots/<commit>}, the
    snapshot's files symlinks to ../../blobs/<sha256>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--CohereForAI--c4ai-command-r-v01"
    _as_hub_snapshot(checkpoint, repo, commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants
    importlib.reload(huggingface_hub.constants)  # the constants read HF_HOME / HF_HUB_OFFLINE at import
    try:
        folder = resolve_checkpoint("command-r")  # the preset names this hub id
        assert folder == repo / "snapshots" / commit
        model, config = load_model("CohereForAI/c4ai-command-r-v01")
        assert config.use_qk_norm  # the checkpoint's own config.json won over the preset's
        with pytest.raises(ModelNotFoundError, match="not in the local hub cache .*HF_HUB_OFFLINE is set"):
            resolve_checkpoint("CohereForAI/aya-23-8B")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def _as_hub_snapshot(checkpoint, repo, commit):
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in checkpoint.iterdir():
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo / "blobs" / blob)
        (snapshot / path.name).symlink_to(f"../../blobs/{blob}")
    return snapshot


def test_a_snapshot_linking_out_of_its_hub_repo_is_refused(tmp_path, checkpoint):
    snapshot = _as_hub_snapshot(checkpoint, tmp_path / "hub" / "models--a--b", "c" * 40)
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(snapshot / "model.safetensors", elsewhere)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match=f"model.safetensors: a symlink to {elsewhere}, outside the checkpoint"):
        resolve_checkpoint(str(snapshot))


def test_shards_outside_the_folder_are_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = save_hf_checkpoint(tmp_path / "one", **CONFIGS["mha-tied"])
    transformers.CohereForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "sh", max_shard_size="50KB")
    index = tmp_path / "sh" / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    name = next(iter(raw["weight_map"]))
    shutil.copyfile(tmp_path / "sh" / raw["weight_map"][name], tmp_path / "outside.safetensors")
    raw["weight_map"][name] = "../outside.safetensors"
    index.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="shard '../outside.safetensors' is not a file name inside"):
        load_model(tmp_path / "sh")


def test_quantized_tensors_are_refused_not_cast(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int8)}))
    with pytest.raises(CheckpointError, match="tensor model.norm.weight is stored as I8"):
        load_model(checkpoint)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bfloat16_and_float16_checkpoints_load(checkpoint, dtype):
    _rewrite(checkpoint, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    stored = load_file(checkpoint / "model.safetensors")
    model, _ = load_model(checkpoint)
    assert all(torch.equal(p, stored[name].float()) for name, p in model.named_parameters())


@pytest.mark.parametrize("text", ['{"vocab_size": ' + "9" * 5000 + "}", "[" * 100000])
def test_config_json_cannot_parse_is_named(checkpoint, text):
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_model(checkpoint)


def test_index_json_cannot_parse_is_named(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text('{"weight_map": ' + "9" * 5000 + "}")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a safetensors index"):
        load_model(checkpoint)


def _edit_config(folder, **changes):
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | changes))


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad, counts", [(float("nan"), "1 NaN and 0 infinite"), (float("inf"), "0 NaN and 1 infinite"),
                                         (float("-inf"), "0 NaN and 1 infinite")])
def test_non_finite_weights_are_refused_with_the_file_and_tensor(checkpoint, stored, bad, counts):
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(tensors):
        tensors.update({k: v.to(stored) for k, v in tensors.items()})
        tensors[name][3, 5] = bad

    _rewrite(checkpoint, poison)
    dtype = str(stored).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"{checkpoint / 'model.safetensors'}: tensor {name} holds {counts} "
                                              rf"value\(s\) in its stored {dtype}"):
        load_model(checkpoint)


def test_a_value_that_overflows_float16_is_refused_when_converting(checkpoint):
    name = "model.norm.weight"
    _rewrite(checkpoint, lambda tensors: tensors[name].__setitem__(0, 1e6))
    model, _ = load_model(checkpoint)  # finite in its stored float32: that load is fine
    assert model.model.norm.weight[0] == 1e6
    with pytest.raises(CheckpointError, match=rf"tensor {name} \(float32\) holds 1 value\(s\) that overflow float16 "
                                              r"\(largest \|value\| 1e\+06, float16 holds up to 6\.55e\+04\)"):
        load_model(checkpoint, torch.float16)


@pytest.mark.parametrize("name", CONFIGS)
def test_expected_tensors_are_the_models_parameters(name):
    """The table the header check compares with, against the model itself built on the meta device."""
    config = CohereConfig(vocab_size=211, intermediate_size=96, num_hidden_layers=3, rope_theta=1e4, **CONFIGS[name])
    with torch.device("meta"):
        model = CohereForCausalLM(config)
    dims = config_dims(config)
    table = [(tensor, tuple(dims[d] for d in shape)) for tensor, shape in expected_tensors(config).items()]
    assert table == [(tensor, tuple(p.shape)) for tensor, p in model.named_parameters()]


@pytest.mark.parametrize("layers, message", [
    (100000, r"missing tensor\(s\) model.layers.2.input_layernorm.weight, model.layers.2.self_attn.q_proj.weight, "
             r".* and \d+ more \(the checkpoint holds 2 layers, config.json says num_hidden_layers=100000\)"),
    (1, r"unexpected tensor\(s\) model.layers.1.input_layernorm.weight, .* \(the checkpoint holds 2 layers, "
        r"config.json says num_hidden_layers=1\)"),
])
def test_a_layer_count_unlike_the_checkpoints_is_refused_from_the_headers_in_seconds(checkpoint, layers, message):
    """Building a 100000-layer model, even on the meta device, takes minutes: the headers are checked first."""
    _edit_config(checkpoint, num_hidden_layers=layers)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        load_model(checkpoint)
    assert time.perf_counter() - started < 30


def test_a_hidden_size_unlike_the_checkpoints_names_the_tensor_and_the_config_fields(checkpoint):
    _edit_config(checkpoint, hidden_size=128)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.embed_tokens.weight has shape "
                                              r"\(211, 64\), config.json implies \(211, 128\) = "
                                              r"\(vocab_size, hidden_size\)"):
        load_model(checkpoint)
