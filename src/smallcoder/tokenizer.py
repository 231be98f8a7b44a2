"""Tokenizer: StarCoder's byte-level BPE through the `tokenizers` library, saved with the config
files `transformers` reads (the chat template included; the format itself is in prompts.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from .errors import SmallCoderError
from .hub import resolve
from .prompts import CHAT_TEMPLATE, EOS_TOKEN

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` with the few operations the rest of SmallCoder needs."""

    def __init__(self, backend: _Backend, config: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.config = dict(config or {})
        eos = _token_content(self.config.get("eos_token")) or EOS_TOKEN
        eos_id = backend.token_to_id(eos)
        if eos_id is None:
            raise SmallCoderError(f"tokenizer has no end-of-sequence token {eos!r}")
        self.eos_token, self.eos_id = eos, eos_id
        self.special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens written in it (e.g. `<fim_prefix>`) included, no BOS."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @classmethod
    def load(cls, path_or_id: str | Path) -> Tokenizer:
        """From a `tokenizer.json` file, a folder holding one, or a Hub repo id."""
        path = resolve(path_or_id, allow_patterns=TOKENIZER_FILES)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise SmallCoderError(f"{path}: no tokenizer.json (SmallCoder reads fast-tokenizer files only)")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - `tokenizers` raises a plain Exception for a bad file
            raise SmallCoderError(f"{file}: not a valid tokenizer.json ({e})") from None
        config: dict[str, Any] = {}
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise SmallCoderError(f"{cfg_file}: not valid JSON ({e})") from None
        return cls(backend, config)

    def save(self, folder: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json plus the config files that `transformers.AutoTokenizer` reads."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        added = self.backend.get_added_tokens_decoder()
        specials = [added[i].content for i in sorted(added) if added[i].special]
        cfg = {k: v for k, v in self.config.items() if k not in ("tokenizer_class", "auto_map")}
        cfg.update({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.eos_token,
            "eos_token": self.eos_token,
            "unk_token": self.eos_token,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "additional_special_tokens": [t for t in specials if t != self.eos_token],
            "chat_template": CHAT_TEMPLATE,
        })
        if model_max_length:
            cfg["model_max_length"] = model_max_length
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        special_map = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "additional_special_tokens")}
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
