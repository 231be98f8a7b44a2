"""Checkpoints in the Hugging Face folder layout, the one format from `init` to export.

A folder holds `config.json`, `model.safetensors` (or shards with
`model.safetensors.index.json`), `generation_config.json` and the tokenizer files, so
`transformers.AutoModelForCausalLM.from_pretrained(folder)` loads what we save and we load
what it saves. Weights are read with safetensors only, never with pickle. Folders are written
beside the target and renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import INT8_ARCHITECTURE, INT8_MODEL_TYPE, ModelConfig, read_config_json
from .errors import SmallCoderError
from .fsutil import atomic_folder
from .hub import resolve
from .model import SmallCoder
from .quant import QUANT_CONFIG, QUANT_METHOD, declared_method, int8_skeleton, is_quantized, quantize_model
from .tokenizer import Tokenizer

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_KEYS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES:
            return dtype
        raise SmallCoderError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise SmallCoderError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def _tensors_to_save(weights: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype,
                     quantized: bool) -> dict[str, torch.Tensor]:
    sd = {}
    for name, t in weights.items():
        if name == "lm_head.weight" and config.tie_word_embeddings and not quantized:
            continue  # tied: transformers re-ties it from the embedding
        keep = quantized and (t.dtype == torch.int8 or name.endswith(".weight_scale"))
        sd[name] = t.detach().to(device="cpu", dtype=t.dtype if keep else dtype).contiguous()
    return sd


def save(model: SmallCoder, tokenizer: Tokenizer | None, folder: str | Path, *,
         dtype: str | torch.dtype | None = None, max_shard_bytes: int | None = None,
         overwrite: bool = False) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face checkpoint folder, atomically."""
    dt = parse_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    return save_weights(model.state_dict(), model.config, tokenizer, folder, dtype=dt,
                        quantized=is_quantized(model), max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def save_weights(weights: dict[str, torch.Tensor], config: ModelConfig, tokenizer: Tokenizer | None,
                 folder: str | Path, *, dtype: str | torch.dtype = torch.float32, quantized: bool = False,
                 max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write a model's state dict (`SmallCoder.state_dict()` names) and `config` as a Hugging Face
    checkpoint folder, atomically: `save` for weights held apart from a model (the trainer's
    gathered DDP / FSDP2 state), so nothing has to be built just to hold them."""
    dt = parse_dtype(dtype)
    folder = Path(folder)
    if tokenizer is not None:
        check_vocab(config.vocab_size, tokenizer.vocab_size, str(folder))
    sd = _tensors_to_save(weights, config, dt, quantized)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        cfg = config.to_hf_dict(dtype=DTYPE_NAMES[dt])
        if quantized:
            cfg["quantization_config"] = dict(QUANT_CONFIG)
            cfg["model_type"], cfg["architectures"] = INT8_MODEL_TYPE, [INT8_ARCHITECTURE]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        eos = config.eos_token_id if tokenizer is None else tokenizer.eos_id
        gen = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        total = sum(t.numel() * t.element_size() for t in sd.values())
        if max_shard_bytes is None or total <= max_shard_bytes:
            save_file(sd, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            shards: list[dict[str, torch.Tensor]] = [{}]
            size = 0
            for name, t in sd.items():
                nbytes = t.numel() * t.element_size()
                if shards[-1] and size + nbytes > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][name] = t
                size += nbytes
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp, model_max_length=config.max_position_embeddings)
    return folder


def check_vocab(model_vocab: int, tokenizer_vocab: int, where: str) -> None:
    """A model and tokenizer that do not belong together are refused before they are saved: ids
    the model cannot embed, or a model vocabulary far past the tokenizer's (its extra ids decode to
    nothing, so a generation from it comes out empty). Padding a vocabulary to a round size, as
    many checkpoints do, stays well inside the bound."""
    if tokenizer_vocab > model_vocab:
        raise SmallCoderError(f"{where}: the tokenizer has {tokenizer_vocab:,} tokens but the model's vocab_size "
                              f"is {model_vocab:,} (ids past {model_vocab - 1:,} have no embedding)")
    if model_vocab > tokenizer_vocab + max(1024, tokenizer_vocab // 8):
        raise SmallCoderError(f"{where}: the model's vocab_size is {model_vocab:,} but the tokenizer has only "
                              f"{tokenizer_vocab:,} tokens (a model made for another tokenizer?); give the config "
                              "vocab_size=tokenizer.vocab_size")


def _weight_files(folder: Path) -> list[Path]:
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE]
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SmallCoderError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise SmallCoderError(f"{index}: names shard(s) that are missing: {', '.join(missing)}")
        return files
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickled:
        raise SmallCoderError(
            f"{folder}: holds only pickled weights ({', '.join(pickled)}); SmallCoder never reads pickle. "
            "Convert them to safetensors first")
    raise SmallCoderError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                    sd[name] = fh.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise SmallCoderError(f"{f}: truncated or corrupt safetensors file ({e})") from None
    return sd


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "head_dim")


def _template(config: ModelConfig, int8: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor of a one-layer model of `config`, built on the meta device
    (no memory); layer tensors stand for every layer as `model.layers.0.*`."""
    with torch.device("meta"):
        model = SmallCoder(config.replace(num_hidden_layers=1))
        if int8:
            int8_skeleton(model)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _fields_deciding(config: ModelConfig, int8: bool, name: str, dim: int) -> list[str]:
    """The config fields whose value sets dimension `dim` of tensor `name` (found by changing each)."""
    base = _template(config, int8)[name][0]
    found = []
    for field in _SHAPE_FIELDS:
        value = getattr(config, field)
        for other in (value * 2, 1, value + 1):
            try:
                shape = _template(config.replace(**{field: other}), int8)[name][0]
            except SmallCoderError:
                continue
            if len(shape) == len(base) and shape[dim] != base[dim]:
                found.append(f"{field} = {value}")
            break
    return found


def check_weights(folder: Path, config: ModelConfig, int8: bool = False,
                  config_path: Path | None = None) -> None:
    """Check the safetensors headers (names, shapes, dtypes) against `config` before any model is
    built, so a config.json that does not fit its weights (a million layers, a wrong width) fails
    in a moment with one line naming the file, the field and the value, instead of allocating."""
    cfg = config_path or folder / "config.json"
    template = _template(config, int8)
    tied = config.tie_word_embeddings and not int8
    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for f in _weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    sl = fh.get_slice(name)
                    found[name] = (f, tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise SmallCoderError(f"{f}: truncated or corrupt safetensors file ({e})") from None
    files = ", ".join(dict.fromkeys(f.name for f, _, _ in found.values())) or "the weights"
    layers: dict[int, dict[str, str]] = {}
    for name in found:
        m = _LAYER.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
    n, have = config.num_hidden_layers, sorted(layers)
    if have == list(range(len(have))) and len(have) != n:  # whole layers too many or too few
        raise SmallCoderError(f"{cfg}: num_hidden_layers = {n} does not match the weights: {files} hold "
                              f"{len(have)} layer(s)")
    expected: dict[str, tuple[str, tuple[tuple[int, ...], torch.dtype]]] = {}  # file name -> (template name, ...)
    for key, spec in template.items():
        m = _LAYER.match(key)
        for i in (range(n) if m else [None]):
            expected[key if m is None else f"model.layers.{i}.{m.group(2)}"] = (key, spec)
    if tied:
        expected.pop("lm_head.weight", None)
    names = {k for k in found if not k.endswith(IGNORED_KEYS) and not (tied and k == "lm_head.weight")}
    missing = sorted(set(expected) - names)
    if missing:
        hint = " (the config has tie_word_embeddings = false)" if missing[0] == "lm_head.weight" else ""
        raise SmallCoderError(f"{cfg}: weights ({files}) lack tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else "") + hint)
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise SmallCoderError(f"{cfg}: weights ({files}) have unexpected tensor(s) {', '.join(unexpected[:5])}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    for name, (key, (shape, dtype)) in expected.items():
        f, got, got_dtype = found[name]
        if got != shape:
            dim = next((d for d in range(min(len(got), len(shape))) if got[d] != shape[d]), 0)
            fields = " / ".join(_fields_deciding(config, int8, key, dim)) or "the config"
            raise SmallCoderError(f"{cfg}: {fields} does not match the weights: tensor {name} has shape {got} "
                                  f"in {f.name}, the config implies {shape}")
        want = {"I8"} if dtype == torch.int8 else _FLOAT_DTYPES
        if got_dtype not in want:
            raise SmallCoderError(f"{f}: tensor {name} has dtype {got_dtype}, expected "
                                  f"{' or '.join(sorted(want))}")


def load_model_weights(model: SmallCoder, sd: dict[str, torch.Tensor], dtype: torch.dtype,
                       source: str) -> None:
    """Check names and shapes against the config (naming any culprit), then assign."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings and not is_quantized(model)  # int8 saves its own head
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_KEYS)}
    if tied:
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise SmallCoderError(f"{source}: weights lack tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        raise SmallCoderError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise SmallCoderError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)} but config.json "
                                  f"implies {tuple(shape)}")
    if is_quantized(model):  # int8 weights and their scales keep their dtypes
        for k, v in sd.items():  # symmetric: the kernel's AVX2 sign trick has no +128 for a -128
            if v.dtype == torch.int8 and bool((v == -128).any()):
                raise SmallCoderError(f"{source}: int8 tensor {k} holds -128; int8 weights are in [-127, 127] "
                                      "(symmetric, one fp32 scale per row)")
        sd = {k: v if v.dtype == torch.int8 or k.endswith(".weight_scale") else v.to(dtype) for k, v in sd.items()}
    else:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=not tied, assign=True)
    model.tie_weights()


def _quant_method(cfg: dict, config_path: Path) -> bool:
    """Whether config.json declares our int8 quantization (and refuse any other kind)."""
    method = declared_method(cfg)
    if method is None:
        return False
    if method != QUANT_METHOD:
        raise SmallCoderError(f"{config_path}: quantization_config.quant_method {method!r} is not supported "
                              f"(SmallCoder reads {QUANT_METHOD!r})")
    return True


def new_model(config: ModelConfig, seed: int = 0, dtype: str | torch.dtype | None = None) -> SmallCoder:
    """A freshly initialised model (the start of every training run)."""
    model = SmallCoder(config)
    model.init_weights(seed)
    return model.to(parse_dtype(dtype))


def _step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1]) if re.fullmatch(r"step-\d+", folder.name) else -1


def _not_a_checkpoint(folder: Path) -> str:
    """Why a folder without config.json is no checkpoint, and where its checkpoints are when it is
    a training run's folder (`--model runs/tiny` for `runs/tiny/final`)."""
    inside = [p for p in (folder / "final", *sorted((folder / "checkpoints").glob("step-*"), key=_step, reverse=True),
                          *sorted(folder.glob("stage-*"))) if (p / "config.json").is_file()]
    if inside:
        return (f"{folder}: a training run's folder, not a checkpoint; its checkpoints are folders inside it: "
                + ", ".join(str(p) for p in inside[:3]) + (", ..." if len(inside) > 3 else ""))
    return f"{folder}/config.json: file not found (not a checkpoint folder)"


def load(path_or_id: str | Path, dtype: str | torch.dtype | None = "float32",
         device: str | torch.device = "cpu", revision: str | None = None,
         with_tokenizer: bool = True) -> tuple[SmallCoder, Tokenizer | None]:
    """Load a model and its tokenizer from a checkpoint folder or a Hub repo id.

    dtype "int8" quantizes a float checkpoint as it loads (quant.py), or loads one saved int8.
    """
    int8 = isinstance(dtype, str) and dtype.lower() == "int8"
    dt = torch.float32 if int8 else parse_dtype(dtype)
    folder = resolve(path_or_id, revision=revision)
    if not folder.is_dir():
        raise SmallCoderError(f"{folder}: is a file; give the checkpoint folder that holds config.json")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise SmallCoderError(_not_a_checkpoint(folder))
    cfg = read_config_json(cfg_path)
    config = ModelConfig.from_hf_dict(cfg, source=str(cfg_path))
    saved_int8 = _quant_method(cfg, cfg_path)
    if saved_int8 and not int8:
        raise SmallCoderError(f"{folder}: holds int8-quantized weights (config.json quantization_config); "
                              "load it with dtype int8 (--dtype int8)")
    check_weights(folder, config, int8=saved_int8, config_path=cfg_path)  # before anything is allocated
    sd = read_weights(folder)
    with torch.device("meta"):
        model = SmallCoder(config)
        if saved_int8:
            int8_skeleton(model)
    load_model_weights(model, sd, dt, source=str(folder))
    if int8 and not saved_int8:
        quantize_model(model)
    model = model.to(device).eval()
    tokenizer = Tokenizer.load(folder) if with_tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        check_vocab(config.vocab_size, tokenizer.vocab_size, str(folder))
    return model, tokenizer
