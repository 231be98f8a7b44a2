"""The token store on disk, and reading it: a pack folder of memory-mappable uint16 shards.

One format serves pretraining and SFT. A pack is a folder:

    index.json          written last; a folder without it is an interrupted write and is refused
    verified.json       optional, written by `TokenDataset.verify(record=True)`: the stat signature
                        (size, mtime, ctime, inode) of each file whose sha256 matched, so an unchanged
                        pack is not hashed again (any write to a file changes its ctime)
    tokens-00000.bin    token ids, uint16 little-endian (vocabularies up to 65,536 tokens)
    mask-00000.bin      SFT only: loss mask, uint8 0/1, one per token
    offsets-00000.bin   SFT only: int64 start of each record in the shard, records + 1 values

`TokenDataset` opens a pack read-only and checks it (index fields, shard sizes, SFT offsets, the
tokenizer it was made with; with `verify`, every file's sha256 and token ids). `smallcoder.data.pack`
writes packs; both share the constants here.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SmallCoderError
from ..fsutil import atomic_write_text, recover_folder

FORMAT = "smallcoder-tokens"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
VERIFIED_FILE = "verified.json"
TOKEN_DTYPE = np.dtype("<u2")
MASK_DTYPE = np.dtype("u1")
OFFSET_DTYPE = np.dtype("<i8")
MAX_VOCAB = int(np.iinfo(np.uint16).max) + 1  # ids 0..65535 fit uint16
_FILE_KINDS = {"tokens": TOKEN_DTYPE, "mask": MASK_DTYPE, "offsets": OFFSET_DTYPE}


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the canonical JSON of what decides token ids (model, added tokens, pre-tokenizer).

    Only those parts are hashed, with keys sorted and BPE merges in one form, so saving and
    loading a tokenizer, or a `tokenizers` release that writes other fields, keeps the hash.
    """
    backend = getattr(tokenizer, "backend", tokenizer)
    data = json.loads(backend.to_str())
    model = dict(data.get("model") or {})
    if "merges" in model:
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
    keep_model = ("type", "vocab", "merges", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                  "byte_fallback")
    canonical = {
        "model": {k: model.get(k) for k in keep_model},
        "added_tokens": sorted([t["id"], t["content"], bool(t.get("special"))] for t in data.get("added_tokens", [])),
        "normalizer": data.get("normalizer"),
        "pre_tokenizer": data.get("pre_tokenizer"),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()



def _signature(path: Path) -> list[int]:
    """What changes whenever a file's bytes may have: size, mtime, ctime (not settable by users), inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_index(folder: Path) -> dict[str, Any]:
    """The pack's index.json as a dict (a pack whose replacement a crash interrupted is put back first)."""
    if not folder.exists():
        recover_folder(folder)
    if not folder.is_dir():
        raise SmallCoderError(f"{folder}: no such pack folder")
    path = folder / INDEX_FILE
    if not path.exists():
        raise SmallCoderError(f"{folder}: incomplete pack: no {INDEX_FILE} (an interrupted write?); pack it again")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmallCoderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise SmallCoderError(f"{path}: expected a JSON object, got {type(index).__name__}")
    return index


class TokenDataset:
    """A pack opened read-only through `np.memmap`: `ds[i] -> (uint16 ids, uint8 loss mask or None)`.

    Opening checks the index (format, version, kind), that every shard exists with the size the
    index gives, SFT offsets, and with `tokenizer` given that it is the one the pack was made
    with. `verify=True` (or `.verify()`) also re-hashes every file, which reads it all.
    Returned arrays are read-only views into the files.
    """

    def __init__(self, folder: str | Path, tokenizer: Any = None, *, verify: bool = False) -> None:
        self.folder = Path(folder)
        self._path = path = self.folder / INDEX_FILE
        self.index = _read_index(self.folder)
        self._check_format()
        self.seq_len: int = self._field("seq_len", int)
        self.eos_id: int = self._field("eos_id", int)
        self.vocab_size: int = self._field("vocab_size", int)
        self.tokenizer_hash: str = self._field("tokenizer_hash", str)
        self.sources: list[dict[str, Any]] = self._field("sources", list)
        self.totals: dict[str, Any] = self._field("totals", dict)
        shards = self._field("shards", list)
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        if not 0 < self.vocab_size <= MAX_VOCAB:
            raise SmallCoderError(f"{path}: field 'vocab_size' is {self.vocab_size}, expected 1..{MAX_VOCAB}")
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._starts = [0]
        for i, shard in enumerate(shards):
            self._open_shard(i, shard)
        self.num_records = self._starts[-1]
        self.num_tokens = int(sum(len(t) for t in self._tokens))
        if self.totals.get("records") not in (None, self.num_records):
            raise SmallCoderError(f"{path}: field 'totals.records' is {self.totals.get('records')}, "
                                  f"but the shards hold {self.num_records}")
        if verify:
            self.verify()

    def _check_format(self) -> None:
        """format, version, kind, dtype and byte order are the ones this reader knows."""
        index, path = self.index, self._path
        fmt = index.get("format")
        if fmt != FORMAT:
            raise SmallCoderError(f"{path}: field 'format' is {fmt!r}, expected {FORMAT!r}")
        version = index.get("version")
        if version != FORMAT_VERSION:
            raise SmallCoderError(f"{path}: field 'version' is {version!r}; this smallcoder reads version "
                                  f"{FORMAT_VERSION} (pack the data again)")
        self.kind: str = self._field("kind", str)
        if self.kind not in ("packed", "sft"):
            raise SmallCoderError(f"{path}: field 'kind' is {self.kind!r}, expected 'packed' or 'sft'")
        for field, expected in (("dtype", "uint16"), ("byteorder", "little")):
            if index.get(field) != expected:
                raise SmallCoderError(f"{path}: field {field!r} is {index.get(field)!r}, expected {expected!r}")

    def _check_tokenizer(self, tokenizer: Any) -> None:
        """The given tokenizer is the one the pack was made with."""
        mine = tokenizer_hash(tokenizer)
        if mine != self.tokenizer_hash:
            raise SmallCoderError(f"{self._path}: pack was made with tokenizer {self.tokenizer_hash}, but the given "
                                  f"tokenizer is {mine}; pack the data again with this tokenizer")
        if self.vocab_size != tokenizer.vocab_size:
            raise SmallCoderError(f"{self._path}: field 'vocab_size' is {self.vocab_size}, but the pack's tokenizer "
                                  f"has {tokenizer.vocab_size} tokens; the index is corrupt, pack it again")

    def _field(self, name: str, kind: type) -> Any:
        value = self.index.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SmallCoderError(f"{self._path}: field {name!r} is {value!r}, expected a {kind.__name__}")
        return value

    def _open_shard(self, i: int, shard: Any) -> None:
        where = f"{self._path}: shards[{i}]"
        try:
            files, records, num_tokens = shard["files"], int(shard["records"]), int(shard["num_tokens"])
            names = {k: files[k] for k in (("tokens", "mask", "offsets") if self.kind == "sft" else ("tokens",))}
        except (KeyError, TypeError, ValueError) as e:
            raise SmallCoderError(f"{where}: malformed shard entry ({e!r})") from None
        expected_len = {"tokens": num_tokens, "mask": num_tokens, "offsets": records + 1}
        arrays = {}
        for key, name in names.items():
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                raise SmallCoderError(f"{where}: field 'files.{key}' is {name!r}, not a file name in the pack")
            file = self.folder / name
            if not file.is_file():
                raise SmallCoderError(f"{file}: shard file is missing")
            dtype = _FILE_KINDS[key]
            size, want = file.stat().st_size, expected_len[key] * dtype.itemsize
            if size != want:
                raise SmallCoderError(f"{file}: {size:,} bytes, but {INDEX_FILE} says {want:,} "
                                      f"({expected_len[key]:,} x {dtype.name}); the shard is truncated or corrupt")
            arrays[key] = (np.memmap(file, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype))
        if self.kind == "packed":
            if num_tokens != records * self.seq_len:
                raise SmallCoderError(f"{where}: num_tokens {num_tokens} != records {records} x seq_len {self.seq_len}")
        else:
            off = arrays["offsets"]
            lengths = np.diff(off)
            if off[0] != 0 or off[-1] != num_tokens or (lengths < 0).any() or (lengths > self.seq_len).any():
                raise SmallCoderError(f"{self.folder / names['offsets']}: record offsets are inconsistent "
                                      f"(start {int(off[0])}, end {int(off[-1])}, tokens {num_tokens}, "
                                      f"max_len {self.seq_len})")
            self._masks.append(arrays["mask"])
            self._offsets.append(off)
        self._tokens.append(arrays["tokens"])
        self._starts.append(self._starts[-1] + records)

    def verify(self, record: bool = False) -> None:
        """Re-hash every shard file against the index, and check its token ids against the vocabulary.

        One pass over the data: ~1 s per GB here (sha256 with SHA-NI plus the id check, the file in
        the page cache; a cold disk is slower).
        With `record`, files already verified are skipped while their stat signature is unchanged,
        and newly verified ones are added to verified.json (when the folder is writable), so a
        rerun or a resume, and the other ranks of a torchrun job, do not read the data again.
        """
        done = self._read_record() if record else {}
        changed = False
        for i, shard in enumerate(self.index["shards"]):
            for key, name in shard["files"].items():
                want = shard.get("sha256", {}).get(key) if isinstance(shard.get("sha256"), dict) else None
                path = self.folder / name
                signature = _signature(path)
                entry = done.get(name)
                if isinstance(entry, dict) and entry.get("sha256") == want and entry.get("stat") == signature:
                    continue
                h = hashlib.sha256()
                top = 0
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                        if key == "tokens" and len(block) >= 2:
                            top = max(top, int(np.frombuffer(block, TOKEN_DTYPE, len(block) // 2).max()))
                if h.hexdigest() != want:
                    raise SmallCoderError(f"{path}: sha256 {h.hexdigest()} does not match "
                                          f"{INDEX_FILE} shards[{i}].sha256.{key} {want}")
                if key == "tokens" and top >= self.vocab_size:
                    raise SmallCoderError(f"{path}: holds token id {top}, outside the vocabulary of "
                                          f"{self.vocab_size} tokens ({INDEX_FILE}); the shard is corrupt")
                done[name] = {"sha256": want, "stat": signature}
                changed = True
        if record and changed:
            with contextlib.suppress(OSError, SmallCoderError):  # a read-only pack is verified each time
                atomic_write_text(self.folder / VERIFIED_FILE, json.dumps({"files": done}, indent=1) + "\n")

    def _read_record(self) -> dict[str, Any]:
        try:
            files = json.loads((self.folder / VERIFIED_FILE).read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return files if isinstance(files, dict) else {}

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        n = self.num_records
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"TokenDataset index must be an integer, got {type(i).__name__}")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for a pack of {n} records")
        s = bisect.bisect_right(self._starts, i) - 1
        j = int(i - self._starts[s])
        if self.kind == "packed":
            ids, mask = np.asarray(self._tokens[s][j * self.seq_len:(j + 1) * self.seq_len]), None
        else:
            a, b = int(self._offsets[s][j]), int(self._offsets[s][j + 1])
            ids, mask = np.asarray(self._tokens[s][a:b]), np.asarray(self._masks[s][a:b])
        if len(ids) and int(ids.max()) >= self.vocab_size:  # ~1 us a record; an id past the embedding would crash
            bad = int(ids.max())
            raise SmallCoderError(f"{self.folder / self.index['shards'][s]['files']['tokens']}: record {j} holds "
                                  f"token id {bad}, outside the vocabulary of {self.vocab_size} tokens "
                                  f"({INDEX_FILE}); the shard is corrupt, pack it again")
        return ids, mask

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.folder)!r}, kind={self.kind!r}, records={self.num_records}, "
                f"tokens={self.num_tokens}, seq_len={self.seq_len})")
