"""Train a StarCoder-style byte-level BPE tokenizer on a new corpus (the command: `smallcoder.data.cli`).

The result has StarCoder's shape, so everything downstream (packing, the chat format, FIM prompts,
GGUF export, `transformers.AutoTokenizer`) treats it like the reference tokenizer: the same 19
special tokens at ids 0..18 (`<|endoftext|>` = 0 is BOS/EOS/UNK/pad), digits split one per token,
byte-level pre-tokenization with the full 256-byte alphabet (any text encodes, nothing is UNK).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from .checks import integer
from .errors import SmallCoderError
from .prompts import EOS_TOKEN
from .tokenizer import Tokenizer

# StarCoder's special tokens in StarCoder's id order (tokenizer_config.json of bigcode/starcoder).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
    "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>",
    "<commit_msg>", "<commit_after>", "<reponame>",
)
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE + 1  # at least one merge
SAMPLE_TEXT = "def add(a, b):\n    return a + 12"


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, *,
                    show_progress: bool = False, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE with StarCoder's pre-tokenizer, decoder and special tokens.

    `vocab_size` counts the specials and the 256 byte tokens; a corpus too small to learn enough
    merges yields a smaller vocabulary (the BPE trainer stops when no pair reaches
    `min_frequency`). `length` (the number of texts, if known) only feeds the progress bar.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise SmallCoderError(f"vocab_size {vocab_size!r} is too small: it must exceed "
                              f"{len(SPECIAL_TOKENS)} special + {BYTE_ALPHABET_SIZE} byte tokens "
                              f"(at least {MIN_VOCAB_SIZE})")
    integer(min_frequency, "min_frequency")

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_checked_texts(texts), trainer=trainer, length=length)
    for i, token in enumerate(SPECIAL_TOKENS):  # the trainer's contract; cheap to confirm
        if backend.token_to_id(token) != i:
            raise RuntimeError(f"BPE trainer put {token} at id {backend.token_to_id(token)}, expected {i}")
    return Tokenizer(backend, {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN, "unk_token": EOS_TOKEN})


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    """The trainer's own error for a non-string is an opaque Rust message; name the item instead."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise SmallCoderError(f"text {i}: expected a string, got {type(t).__name__}")
        yield t


def iter_inputs(specs: list, limit: int | None, counts: dict[str, int]) -> Iterator[str]:
    """Texts of every source in order, stopping after `limit` documents; counts docs per label.

    A conversation source contributes its conversations rendered in the card's chat format,
    which is the text the model will see.
    """
    from .data.sources import iter_conversations, iter_texts
    from .prompts import format_chat

    def texts_of(spec) -> Iterator[str]:
        if spec.is_sft:
            return (format_chat(m, add_generation_prompt=False) for m in iter_conversations(spec))
        return iter_texts(spec)

    def all_texts() -> Iterator[str]:
        for spec in specs:
            label = str(getattr(spec, "display_label", None) or spec.label)
            counts.setdefault(label, 0)
            for text in texts_of(spec):
                counts[label] += 1
                yield text

    yield from itertools.islice(all_texts(), limit)
