"""`smallcoder export --format gguf`: a checkpoint folder as one GGUF file for llama.cpp.

The file is what llama.cpp's own `convert_hf_to_gguf.py` writes for a `LlamaForCausalLM`
folder: architecture `llama`, its tensor names, q_proj/k_proj rows permuted from the
rotate-half RoPE layout (HF, ours) to the adjacent-pairs layout that llama.cpp's `llama`
architecture rotates (`LlamaModel.permute`), norms kept in F32 and 2-D weights in the chosen
type. On top of that it writes the FIM token ids, marks special tokens as control tokens and
embeds the chat template, so editors' FIM prompts and chat clients work with the file as is.
Q8_0 is the default since 4-bit types visibly hurt models under 1B parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import known, require_extra
from .config import read_config_json
from .errors import SmallCoderError
from .fsutil import atomic_path
from .prompts import CHAT_TEMPLATE, FILE_SEP, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, REPO_NAME

if TYPE_CHECKING:
    import numpy as np

FORMATS = ("gguf",)
OUTTYPES = ("f32", "f16", "q8_0")
DEFAULT_OUTTYPE = "q8_0"

# tokenizer.json pre-tokenizers we can name for llama.cpp (`tokenizer.ggml.pre`). llama.cpp gives
# "starcoder" (and "refact", which convert_hf_to_gguf.py picks for StarCoder's vocabulary by its
# hash) the regexes `\p{N}` then the GPT-2 word regex: Digits(individual) + ByteLevel. "gpt-2" is
# the GPT-2 word regex alone: a plain ByteLevel pre-tokenizer.
_STARCODER_PRE = [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]
_GPT2_PRE = [{"type": "ByteLevel", "use_regex": True}]

# llama.cpp's FIM metadata keys and the vocabulary entries they name when the vocabulary has them.
GGUF_FIM_KEYS = {
    "tokenizer.ggml.fim_pre_token_id": FIM_PREFIX,
    "tokenizer.ggml.fim_suf_token_id": FIM_SUFFIX,
    "tokenizer.ggml.fim_mid_token_id": FIM_MIDDLE,
    "tokenizer.ggml.fim_pad_token_id": FIM_PAD,
    "tokenizer.ggml.fim_rep_token_id": REPO_NAME,
    "tokenizer.ggml.fim_sep_token_id": FILE_SEP,
}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from rotate-half order to llama.cpp's adjacent pairs.

    Exactly convert_hf_to_gguf.py's `LlamaModel.permute` (with `n_head` = the kv head count for
    k_proj): within each head, output row i of the first half and i of the second half become
    rows 2i and 2i+1, the pair that llama.cpp's `llama` RoPE (mode NORM) rotates together.
    """
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def _pre_tokenizer_name(tok_json: dict[str, Any], source: str) -> str:
    """The `tokenizer.ggml.pre` whose llama.cpp regexes match this tokenizer.json's pre-tokenizer."""
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise SmallCoderError(f"{source}: field model.type is {model.get('type')!r}; GGUF export handles "
                              "byte-level BPE tokenizers only")
    if not model.get("merges"):
        raise SmallCoderError(f"{source}: the BPE tokenizer has no merges, and llama.cpp refuses a GGUF without "
                              "them (\"cannot find tokenizer merges\"); export a model whose tokenizer was trained "
                              "with merges (smallcoder tokenizer train)")
    if model.get("byte_fallback") or model.get("ignore_merges"):
        raise SmallCoderError(f"{source}: BPE options byte_fallback/ignore_merges are not supported by the "
                              "GGUF export (llama.cpp's gpt2 tokenizer would tokenize differently)")
    if tok_json.get("normalizer") is not None:
        raise SmallCoderError(f"{source}: field normalizer is {tok_json['normalizer'].get('type')!r}; "
                              "llama.cpp's gpt2 tokenizer applies none, so the export would tokenize differently")
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def matches(expected: list[dict[str, Any]]) -> bool:
        return len(steps) == len(expected) and all(
            all(s.get(k) == v for k, v in e.items()) and not s.get("add_prefix_space", False)
            for s, e in zip(steps, expected))

    if matches(_STARCODER_PRE):
        return "starcoder"
    if matches(_GPT2_PRE):
        return "gpt-2"
    raise SmallCoderError(
        f"{source}: field pre_tokenizer {json.dumps(pre)} has no llama.cpp equivalent known to SmallCoder "
        "(supported: Sequence[Digits(individual_digits), ByteLevel] as 'starcoder', ByteLevel as 'gpt-2')")


def _merges(tok_json: dict[str, Any]) -> list[str]:
    """BPE merges as llama.cpp stores them ("a b"); tokenizers writes strings or [a, b] pairs."""
    out = []
    for m in tok_json["model"].get("merges", []):
        out.append(m if isinstance(m, str) else " ".join(m))
    return out


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's `does_token_look_special` for the cases a code tokenizer can have."""
    return (token.startswith("<|") and token.endswith("|>")) or token == "<pad>"


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, source: str) -> dict[str, int]:
    """Write the vocabulary, merges, special ids and chat template; return the FIM ids written."""
    import gguf

    tok_json = json.loads(tokenizer.backend.to_str())
    pre = _pre_tokenizer_name(tok_json, source)
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    added = tokenizer.backend.get_added_tokens_decoder()
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:  # the model's embedding is larger than the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = by_id[i]
        tokens.append(tok)
        if i in added:
            control = added[i].special or _looks_special(tok)
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tok_json))

    def special_id(field: str) -> int:
        value = tokenizer.config.get(field)
        name = value.get("content") if isinstance(value, dict) else value
        tid = tokenizer.token_to_id(name) if name else None
        return tokenizer.eos_id if tid is None else tid

    writer.add_bos_token_id(special_id("bos_token"))
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(special_id("unk_token"))
    writer.add_add_bos_token(False)  # the model card's prompts start without BOS
    writer.add_add_eos_token(False)
    fim = {}
    for key, text in GGUF_FIM_KEYS.items():
        tid = vocab.get(text)
        if tid is not None and tid < vocab_size:
            writer.add_uint32(key, tid)
            fim[key] = tid
    template = tokenizer.config.get("chat_template")
    writer.add_chat_template(template if isinstance(template, str) and template else CHAT_TEMPLATE)
    return fim


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise SmallCoderError(f"{out}: is a folder; give the .gguf file to write")
    if out.exists() and not overwrite:
        raise SmallCoderError(f"{out}: file exists (refusing to overwrite it; pass --force to replace it)")
    if out.parent.exists() and not out.parent.is_dir():
        raise SmallCoderError(f"{out.parent}: is not a folder")


def _check_float_checkpoint(folder: Path) -> None:
    """Refuse a folder that holds int8 weights: GGUF export needs the float weights."""
    from .quant import declared_method

    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise SmallCoderError(f"{folder}: no config.json (give a SmallCoder / Hugging Face checkpoint folder)")
    method = declared_method(read_config_json(cfg_file))
    if method is not None:
        raise SmallCoderError(
            f"{cfg_file}: field quantization_config ({method!r}) marks a quantized checkpoint; "
            "export from the float checkpoint (GGUF export quantizes by itself, see --outtype)")


def export_gguf(model: str | Path, out: str | Path, outtype: str = DEFAULT_OUTTYPE, *,
                overwrite: bool = False, name: str | None = None) -> Path:
    """Write checkpoint `model` (folder or Hub id) as a llama.cpp GGUF file at `out`.

    `outtype` is the type of the 2-D weights (f32, f16 or q8_0); norms stay F32, as llama.cpp
    expects. The file appears atomically; an existing `out` is replaced only with `overwrite`.
    """
    outtype = known(str(outtype).lower(), "--outtype", OUTTYPES)
    out = Path(out).expanduser()
    _check_out(out, overwrite)
    require_extra("export", ["gguf"], "GGUF export")
    import gguf
    from tqdm import tqdm

    from .checkpoint import load
    from .hub import resolve

    folder = resolve(model)
    if not folder.is_dir():
        raise SmallCoderError(f"{folder}: is a file; give the checkpoint folder that holds config.json")
    _check_float_checkpoint(folder)
    net, tokenizer = load(folder, dtype="float32")
    assert tokenizer is not None
    cfg = net.config

    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    arch = gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])

    # Tensors first (the parameter count names the size label), in convert_hf_to_gguf.py's types.
    tensor_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    state = {k: v for k, v in net.state_dict().items()
             if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    show = sys.stderr.isatty()
    for hf_name, tensor in tqdm(state.items(), desc="Converting", unit="tensor", disable=not show):
        new_name = tensor_map.get_name(hf_name, try_suffixes=(".weight",))
        if new_name is None:
            raise SmallCoderError(f"{folder}: tensor {hf_name} has no llama.cpp name")
        data = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = permute_qk(data, cfg.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = permute_qk(data, cfg.num_key_value_heads)
        qtype = qtypes[outtype]
        if data.ndim <= 1 or new_name.endswith("_norm.weight"):
            qtype = gguf.GGMLQuantizationType.F32
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # a row not a multiple of the block size: F16, as convert does
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(new_name, packed, raw_dtype=qtype)

    total_params = writer.get_total_parameter_count()[0]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_name(model))
    writer.add_size_label(gguf.size_label(total_params, 0, 0, 0))
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_file_type(ftypes[outtype])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size, source=f"{folder / 'tokenizer.json'}")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=show)
        finally:
            writer.close()
    return out


def model_name(model: str | Path) -> str:
    """The name a runtime shows for a checkpoint: a Hub id as it is; a local folder's name, or its
    run's name for the folders a training run writes (`runs/tiny/final` -> `tiny`,
    `runs/tiny/stage-code` -> `tiny-stage-code`, a checkpoint `.../checkpoints/step-0000120` ->
    `tiny-step-0000120`)."""
    local = Path(model).expanduser()
    if not local.exists():
        return str(model)
    folder = local.resolve()
    if folder.name == "final":
        return folder.parent.name
    if folder.name.startswith("stage-"):
        return f"{folder.parent.name}-{folder.name}"
    if folder.name.startswith("step-") and folder.parent.name == "checkpoints":
        return f"{folder.parent.parent.name}-{folder.name}"
    return folder.name


def cmd_export(args: argparse.Namespace) -> None:
    known(args.format, "--format", FORMATS)
    path = export_gguf(args.model, args.out, args.outtype, overwrite=args.force)
    size = path.stat().st_size
    print(f"wrote {path}: GGUF ({args.outtype}), {size / 2**20:.1f} MiB")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint for other runtimes (GGUF for llama.cpp)")
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face Hub repo id")
    p.add_argument("--format", required=True, help=f"{' | '.join(FORMATS)} (llama.cpp, Ollama, LM Studio)")
    p.add_argument("--outtype", default=DEFAULT_OUTTYPE, type=str.lower,
                   help=f"type of the 2-D weights: {' | '.join(OUTTYPES)} (default {DEFAULT_OUTTYPE}; norms stay f32)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_export)
