"""Checkpoint folders: round trips, config.json forms, every bad input, atomic writes, the Hub path."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import smallcoder
import smallcoder.checkpoint as ckpt
from smallcoder import ModelConfig, SmallCoderError, Tokenizer, load, new_model, preset, save

TOKENS = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 11]])


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(TOKENS.to(next(model.parameters()).device)).float()


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


@pytest.fixture()
def model(micro_config):
    return new_model(micro_config, seed=1)


@pytest.fixture()
def ckpt_copy(micro_checkpoint, tmp_path) -> Path:
    """A private copy of the micro checkpoint that a test may break."""
    dst = tmp_path / "copy"
    shutil.copytree(micro_checkpoint, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# ---- round trips -------------------------------------------------------------------------------


def test_round_trip_fp32_identical(model, small_tokenizer, tmp_path):
    out = save(model, small_tokenizer, tmp_path / "m")
    assert (out / "model.safetensors").exists()
    loaded, tok = load(out)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert got[k].dtype == torch.float32, k
        assert torch.equal(want[k], got[k]), k
    assert torch.equal(_logits(model), _logits(loaded))
    assert tok.encode("def add(a, b):") == small_tokenizer.encode("def add(a, b):")
    assert tok.eos_id == small_tokenizer.eos_id


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                                ("bf16", torch.bfloat16)])
def test_load_with_dtype(micro_checkpoint, dtype, torch_dtype):
    m, _ = load(micro_checkpoint, dtype=dtype)
    assert {p.dtype for p in m.parameters()} == {torch_dtype}
    ref, _ = load(micro_checkpoint)
    # the same weights, rounded: close to fp32, not bit-identical
    for (k, a), (_, b) in zip(ref.state_dict().items(), m.state_dict().items()):
        assert torch.allclose(a, b.float(), rtol=1e-2, atol=1e-3), k


def test_save_in_bfloat16_writes_bf16_and_config_dtype(model, tmp_path):
    out = save(model, None, tmp_path / "m", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("lm_head.weight").dtype == torch.bfloat16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    loaded, tok = load(out, with_tokenizer=False)
    assert tok is None
    assert next(loaded.parameters()).dtype == torch.float32  # load's default dtype


def test_tied_model_saves_no_lm_head_and_reties(micro_config, small_tokenizer, tmp_path):
    cfg = micro_config.replace(tie_word_embeddings=True)
    m = new_model(cfg, seed=2)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    out = save(m, small_tokenizer, tmp_path / "tied")
    keys = set(load_file(str(out / "model.safetensors")))
    assert "lm_head.weight" not in keys
    assert "model.embed_tokens.weight" in keys
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    loaded, _ = load(out)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(_logits(m), _logits(loaded))


def test_sharded_save_and_load(model, small_tokenizer, tmp_path):
    out = save(model, small_tokenizer, tmp_path / "sharded", max_shard_bytes=40_000)
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    loaded, _ = load(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert torch.equal(_logits(model), _logits(loaded))


def test_sharded_index_naming_missing_shard(model, tmp_path):
    out = save(model, None, tmp_path / "sharded", max_shard_bytes=40_000)
    victim = sorted(out.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(SmallCoderError, match="missing") as e:
        load(out, with_tokenizer=False)
    assert victim.name in str(e.value)


# ---- config.json -------------------------------------------------------------------------------


def test_written_config_has_both_rope_forms(micro_checkpoint, micro_config):
    cfg = json.loads((micro_checkpoint / "config.json").read_text())
    assert cfg["rope_theta"] == micro_config.rope_theta
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": micro_config.rope_theta}
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 16
    assert ModelConfig.from_hf_dict(cfg) == micro_config


def _hf_base(**extra) -> dict:
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000,
         "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 8,
         "num_key_value_heads": 2, "intermediate_size": 320, "head_dim": 32,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
         "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    d.update(extra)
    return d


def test_from_hf_dict_v4_form():
    c = ModelConfig.from_hf_dict(_hf_base(rope_theta=500000.0, rope_scaling=None))
    assert c.rope_theta == 500000.0
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 2, 32)
    assert c.tie_word_embeddings is True
    assert c.rms_norm_eps == 1e-5
    assert c.max_position_embeddings == 4096
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (1000, 128, 3, 320)
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)


def test_from_hf_dict_v5_form():
    c = ModelConfig.from_hf_dict(_hf_base(rope_parameters={"rope_type": "default", "rope_theta": 123456.0}))
    assert c.rope_theta == 123456.0
    assert c.head_dim == 32 and c.num_key_value_heads == 2


def test_from_hf_dict_defaults_and_eos_list():
    d = _hf_base(eos_token_id=[7, 8], tie_word_embeddings=False)
    for k in ("head_dim", "num_key_value_heads"):
        del d[k]
    c = ModelConfig.from_hf_dict(d)
    assert c.eos_token_id == 7
    assert c.head_dim == 128 // 8
    assert c.num_key_value_heads == 8  # absent: multi-head attention
    assert c.tie_word_embeddings is False
    assert c.rope_theta == 10000.0


# ---- bad inputs --------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SmallCoderError, match="no such file or folder") as e:
        load(missing)
    assert str(missing) in str(e.value)


def test_folder_without_config(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(SmallCoderError, match=r"config\.json: file not found"):
        load(ckpt_copy)


def test_folder_without_weights(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(SmallCoderError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load(ckpt_copy)


class _Trap:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_folder_is_refused_without_unpickling(ckpt_copy, tmp_path):
    # the trap works: unpickling it does create its marker
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Trap(probe))).close()
    assert probe.exists()

    marker = tmp_path / "UNPICKLED"
    (ckpt_copy / "model.safetensors").unlink()
    (ckpt_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(SmallCoderError) as e:
        load(ckpt_copy)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "never reads pickle" in msg
    assert not marker.exists()


def test_not_llama_family(ckpt_copy):
    _edit_config(ckpt_copy, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(SmallCoderError, match="model_type 'gpt2'.*not a Llama-family"):
        load(ckpt_copy)


def test_config_invalid_json(ckpt_copy):
    (ckpt_copy / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(SmallCoderError, match="not valid JSON"):
        load(ckpt_copy)


def test_config_not_an_object(ckpt_copy):
    (ckpt_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(SmallCoderError, match="expected a JSON object"):
        load(ckpt_copy)


def test_weight_shape_disagrees_with_config(ckpt_copy):
    sd = load_file(str(ckpt_copy / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    rows, cols = sd[name].shape
    sd[name] = torch.zeros(rows + 1, cols)
    save_file(sd, str(ckpt_copy / "model.safetensors"))
    with pytest.raises(SmallCoderError) as e:
        load(ckpt_copy)
    msg = str(e.value)
    assert name in msg
    assert f"({rows + 1}, {cols})" in msg and f"({rows}, {cols})" in msg


def test_config_disagrees_with_weights(ckpt_copy):
    _edit_config(ckpt_copy, intermediate_size=96)
    with pytest.raises(SmallCoderError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        load(ckpt_copy)


def test_missing_tensor_named(ckpt_copy):
    sd = load_file(str(ckpt_copy / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(ckpt_copy / "model.safetensors"))
    with pytest.raises(SmallCoderError, match=r"lack tensor\(s\) model\.layers\.1\.self_attn\.k_proj\.weight"):
        load(ckpt_copy)


def test_unexpected_tensor_named(ckpt_copy):
    sd = load_file(str(ckpt_copy / "model.safetensors"))
    sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, str(ckpt_copy / "model.safetensors"))
    with pytest.raises(SmallCoderError, match=r"unexpected tensor\(s\) model\.layers\.9\.mlp\.up_proj\.weight"):
        load(ckpt_copy)


def test_truncated_safetensors(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SmallCoderError, match="truncated or corrupt") as e:
        load(ckpt_copy)
    assert str(f) in str(e.value)


def test_corrupt_safetensors(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(SmallCoderError, match="truncated or corrupt"):
        load(ckpt_copy)


@pytest.mark.parametrize("dtype", ["float8", "int4", "float64"])
def test_unknown_dtype(micro_checkpoint, dtype):
    with pytest.raises(SmallCoderError, match=f"unknown dtype '{dtype}'.*float32, bfloat16 or float16"):
        load(micro_checkpoint, dtype=dtype)


def test_unsupported_torch_dtype(model, tmp_path):
    with pytest.raises(SmallCoderError, match="unsupported dtype"):
        save(model, None, tmp_path / "m", dtype=torch.int8)
    assert not (tmp_path / "m").exists()


def test_unknown_preset():
    with pytest.raises(SmallCoderError, match="unknown preset 'nope'.*smallcoder-303m.*tiny"):
        preset("nope")


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_type(ckpt_copy, field):
    rope = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}
    if field == "rope_scaling":
        _edit_config(ckpt_copy, rope_parameters=None, rope_scaling=rope)
    else:
        _edit_config(ckpt_copy, rope_parameters=rope)
    with pytest.raises(SmallCoderError, match="rope_type 'llama3' is not supported"):
        load(ckpt_copy)


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_bias_flags_refused(ckpt_copy, flag):
    _edit_config(ckpt_copy, **{flag: True})
    with pytest.raises(SmallCoderError, match=f"{flag}=true is not supported"):
        load(ckpt_copy)


def test_invalid_config_values():
    with pytest.raises(SmallCoderError, match="must be a multiple of num_key_value_heads"):
        ModelConfig.from_hf_dict(_hf_base(num_key_value_heads=3))
    with pytest.raises(SmallCoderError, match="missing field"):
        d = _hf_base()
        del d["vocab_size"]
        ModelConfig.from_hf_dict(d)
    with pytest.raises(SmallCoderError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf_dict(_hf_base(hidden_act="gelu"))


@pytest.mark.parametrize("field, value", [
    ("rms_norm_eps", "abc"), ("rms_norm_eps", [1e-6]), ("rms_norm_eps", None), ("rope_theta", "1e4"),
    ("initializer_range", {}), ("hidden_size", "64"), ("num_key_value_heads", 2.0), ("num_hidden_layers", True),
    ("max_position_embeddings", 12.5), ("tie_word_embeddings", "no"), ("eos_token_id", "0"),
    ("bos_token_id", -1), ("head_dim", [16]), ("rope_parameters", "default"), ("model_type", ["llama"]),
    ("architectures", "LlamaForCausalLM"), ("intermediate_size", None)])
def test_config_field_of_the_wrong_type_is_one_line(ckpt_copy, field, value):
    """Every config.json field of the wrong type names the file, the field and the value (the
    class of a non-numeric rms_norm_eps, which raised a bare ValueError)."""
    extra = {"rope_parameters": None} if field == "rope_theta" else {}  # else rope_parameters' theta wins
    _edit_config(ckpt_copy, **{field: value}, **extra)
    with pytest.raises(SmallCoderError) as e:
        load(ckpt_copy)
    msg = str(e.value)
    assert str(ckpt_copy / "config.json") in msg and field in msg and repr(value)[:10] in msg, msg


@pytest.mark.parametrize("changes, field", [
    ({"num_hidden_layers": 1_000_000}, "num_hidden_layers = 1000000"),
    ({"num_hidden_layers": 1}, "num_hidden_layers = 1"),
    ({"intermediate_size": 96}, "intermediate_size = 96"),
    ({"vocab_size": 4096}, "vocab_size = 4096"),
    ({"num_key_value_heads": 4}, "num_key_value_heads = 4"),
    ({"head_dim": 8}, "head_dim = 8"),
])
def test_weights_checked_against_config_before_the_model_is_built(ckpt_copy, monkeypatch, changes, field):
    """A config.json that does not fit its weights fails from the safetensors header, before a
    model of the config's size is ever constructed (a million layers used to take minutes)."""
    _edit_config(ckpt_copy, **changes)
    real = ckpt.SmallCoder
    built = []

    def watched(config):
        built.append(config.num_hidden_layers)
        assert config.num_hidden_layers <= 2, "a model of the bad config was built"
        return real(config)

    monkeypatch.setattr(ckpt, "SmallCoder", watched)
    with pytest.raises(SmallCoderError) as e:
        load(ckpt_copy)
    msg = str(e.value)
    assert msg.startswith(f"{ckpt_copy / 'config.json'}: ") and field in msg, msg


def test_weights_of_the_wrong_dtype_are_named(ckpt_copy):
    sd = load_file(str(ckpt_copy / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int64)
    save_file(sd, str(ckpt_copy / "model.safetensors"))
    with pytest.raises(SmallCoderError, match=r"model\.safetensors: tensor model\.norm\.weight has dtype I64"):
        load(ckpt_copy)


def test_tokenizer_larger_than_vocab(ckpt_copy, micro_config, small_tokenizer):
    _edit_config(ckpt_copy, vocab_size=micro_config.vocab_size - 10)
    sd = load_file(str(ckpt_copy / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = sd[k][:-10].contiguous()
    save_file(sd, str(ckpt_copy / "model.safetensors"))
    with pytest.raises(SmallCoderError, match="tokenizer has .* tokens but the model's vocab_size"):
        load(ckpt_copy)


@pytest.mark.parametrize("model_vocab, why", [(-10, "ids past .* have no embedding"),
                                               (+5000, "a model made for another tokenizer")])
def test_save_refuses_a_tokenizer_that_does_not_fit(micro_config, small_tokenizer, tmp_path, model_vocab, why):
    """#17 item 10: a tokenizer larger than the model, or a model vocabulary far past the tokenizer's
    (the README's old example: 49,152 ids, a 4,096-token tokenizer, empty generations), is one line
    naming the folder, and nothing is written; padding the vocabulary to a round size is fine."""
    from smallcoder import new_model, save

    folder = tmp_path / "m"
    config = micro_config.replace(vocab_size=small_tokenizer.vocab_size + model_vocab)
    with pytest.raises(SmallCoderError, match=f"^{folder}: .*{why}"):
        save(new_model(config), small_tokenizer, folder)
    assert not folder.exists()
    padded = micro_config.replace(vocab_size=small_tokenizer.vocab_size + 64)
    save(new_model(padded), small_tokenizer, folder)
    assert load(folder)[0].config.vocab_size == small_tokenizer.vocab_size + 64


def test_a_run_folder_given_as_model_names_its_checkpoints(micro_checkpoint, tmp_path):
    """#17 item 1: `--model runs/tiny` (the run, not its checkpoint) says where the checkpoints are."""
    run = tmp_path / "run"
    for sub in ("final", "checkpoints/step-20", "checkpoints/step-100", "stage-code"):
        shutil.copytree(micro_checkpoint, run / sub)
    (run / "run.json").write_text("{}")
    with pytest.raises(SmallCoderError) as e:
        load(run)
    assert str(e.value) == (f"{run}: a training run's folder, not a checkpoint; its checkpoints are folders inside "
                            f"it: {run}/final, {run}/checkpoints/step-100, {run}/checkpoints/step-20, ...")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SmallCoderError, match=r"empty/config\.json: file not found \(not a checkpoint folder\)"):
        load(tmp_path / "empty")


# ---- atomic writes -----------------------------------------------------------------------------


def test_refuses_non_empty_folder_without_overwrite(model, micro_checkpoint, tmp_path):
    target = tmp_path / "existing"
    shutil.copytree(micro_checkpoint, target)
    (target / "notes.txt").write_text("mine")
    before = _tree(target)
    with pytest.raises(SmallCoderError, match="not empty"):
        save(new_model(model.config, seed=99), None, target)
    assert _tree(target) == before
    assert _siblings(target) == ["existing"]


def test_overwrite_replaces(model, small_tokenizer, micro_checkpoint, tmp_path):
    target = tmp_path / "existing"
    shutil.copytree(micro_checkpoint, target)
    (target / "notes.txt").write_text("stale")
    other = new_model(model.config, seed=99)
    save(other, small_tokenizer, target, overwrite=True)
    assert not (target / "notes.txt").exists()  # the folder is replaced, not merged
    loaded, _ = load(target)
    assert torch.equal(loaded.lm_head.weight, other.lm_head.weight)
    assert _siblings(target) == ["existing"]


def test_save_failing_midway_leaves_nothing(model, small_tokenizer, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    target = tmp_path / "new"
    with pytest.raises(OSError, match="disk full"):
        save(model, small_tokenizer, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_failing_midway_keeps_previous_checkpoint(model, micro_checkpoint, tmp_path, monkeypatch):
    target = tmp_path / "existing"
    shutil.copytree(micro_checkpoint, target)
    before = _tree(target)
    calls = []

    def boom(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second shard
            raise OSError("disk full")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save(new_model(model.config, seed=5), None, target, overwrite=True, max_shard_bytes=40_000)
    assert len(calls) == 2
    assert _tree(target) == before
    assert _siblings(target) == ["existing"]
    load(target)


def test_failed_final_rename_restores_previous_checkpoint(model, micro_checkpoint, tmp_path, monkeypatch):
    target = tmp_path / "existing"
    shutil.copytree(micro_checkpoint, target)
    before = _tree(target)
    from smallcoder import fsutil

    real_rename = fsutil.os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".existing.tmp-"):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(fsutil.os, "rename", rename)
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)  # the two-rename path (no renameat2)
    with pytest.raises(OSError, match="rename failed"):
        save(new_model(model.config, seed=5), None, target, overwrite=True)
    monkeypatch.undo()
    assert _tree(target) == before
    assert _siblings(target) == ["existing"]


# ---- the Hugging Face Hub path -----------------------------------------------------------------


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An offline Hub cache at tmp_path/hub (constants are read at import, so patch them too)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # so "acme/micro" cannot be a local folder by accident
    return cache


def test_load_from_hub_cache_offline(offline_hub, micro_checkpoint):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--acme--micro"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(micro_checkpoint, snapshot)

    model, tok = smallcoder.load("acme/micro")
    ref, ref_tok = load(micro_checkpoint)
    assert torch.equal(_logits(model), _logits(ref))
    assert tok.encode("hello there") == ref_tok.encode("hello there")
    tok2 = Tokenizer.load("acme/micro")
    assert tok2.vocab_size == ref_tok.vocab_size and tok2.eos_id == ref_tok.eos_id


def test_unknown_repo_offline(offline_hub):
    with pytest.raises(SmallCoderError, match="acme/nothing.*Hugging Face Hub"):
        smallcoder.load("acme/nothing")
    with pytest.raises(SmallCoderError, match="Hugging Face Hub"):
        Tokenizer.load("acme/nothing")


# ---- parameter counts --------------------------------------------------------------------------


def test_303m_parameter_count():
    cfg = preset("smallcoder-303m")
    assert cfg.num_parameters == 302_027_520
    tied = cfg.replace(tie_word_embeddings=True)
    assert tied.num_parameters == 302_027_520 - 49152 * 768 == 264_278_784
    with torch.device("meta"):  # the real module agrees, without allocating 1.2 GB
        assert smallcoder.SmallCoder(cfg).num_parameters() == 302_027_520
        assert smallcoder.SmallCoder(tied).num_parameters() == 264_278_784


def test_tiny_preset_count_matches_module(micro_config):
    cfg = preset("tiny").replace(vocab_size=micro_config.vocab_size)
    with torch.device("meta"):
        assert smallcoder.SmallCoder(cfg).num_parameters() == cfg.num_parameters


def test_flops_and_matmul_parameters_from_the_config():
    """One formula: the trainer's MFU, bench_train and bench decode all read these."""
    cfg = preset("smallcoder-303m")
    assert cfg.flops_per_token(1024) == 1_811_939_328.0  # 1.81 GFLOP per trained token (trainer docstring)
    with torch.device("meta"):
        model = smallcoder.SmallCoder(cfg.replace(num_key_value_heads=2))
    layers = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    gqa = cfg.replace(num_key_value_heads=2)
    assert gqa.matmul_parameters(head=False) == layers
    assert gqa.matmul_parameters() == layers + model.lm_head.weight.numel()
    assert gqa.flops_per_token(256) == 6.0 * gqa.matmul_parameters() + 12.0 * 24 * 768 * 256


@pytest.mark.parametrize("tied", [False, True])
def test_save_weights_writes_what_save_writes(micro_config, small_tokenizer, tmp_path, tied):
    """A state dict held apart from a model (the trainer's gathered weights) saves to the same
    folder as the model it came from, so nothing is built just to hold it."""
    model = new_model(micro_config.replace(tie_word_embeddings=tied), seed=1)
    save(model, small_tokenizer, tmp_path / "a")
    ckpt.save_weights(model.state_dict(), model.config, small_tokenizer, tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("field, shown", [
    ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
    ("awq", "'awq'"),
    ({"bits": 4}, "{'bits': 4}"),  # an object that names no method
    ({"quant_method": None}, "{'quant_method': None}"),
])
def test_load_and_export_read_config_json_quantization_alike(micro_checkpoint, tmp_path, field, shown):
    """One reading of config.json's quantization_config: loading refuses what it does not
    support and the GGUF export refuses any quantized folder, both naming the same value."""
    import re

    from smallcoder import export

    folder = tmp_path / "q"
    shutil.copytree(micro_checkpoint, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = field
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SmallCoderError, match=re.escape(f"quantization_config.quant_method {shown} is not supported")):
        load(folder, dtype="int8")
    with pytest.raises(SmallCoderError, match=re.escape(f"field quantization_config ({shown}) marks a quantized")):
        export._check_float_checkpoint(folder)


def test_a_null_quantization_config_is_a_float_checkpoint(micro_checkpoint, tmp_path):
    from smallcoder import export

    folder = tmp_path / "f"
    shutil.copytree(micro_checkpoint, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = None
    (folder / "config.json").write_text(json.dumps(cfg))
    model, _ = load(folder)
    assert model.lm_head.weight.dtype == torch.float32
    export._check_float_checkpoint(folder)  # no error


def test_an_int8_folder_is_refused_by_transformers_not_misread(micro_checkpoint, tmp_path):
    """transformers used to load an int8 folder with only warnings (int8 tensors read as floats)
    and generate garbage; the folder now names a model type of its own, which it refuses, while
    smallcoder loads it as before."""
    transformers = pytest.importorskip("transformers")
    model, tok = load(micro_checkpoint, dtype="int8")
    save(model, tok, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["model_type"] == "smallcoder_int8" and cfg["architectures"] == ["SmallCoderInt8ForCausalLM"]
    with pytest.raises((ValueError, KeyError), match="smallcoder_int8"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    again, _ = load(tmp_path / "q", dtype="int8")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(again(ids), model(ids))
