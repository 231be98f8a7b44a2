"""The prompt formats a SmallCoder model is trained and run with: the card's chat format and
StarCoder's fill-in-the-middle. Every user of them imports them from here (training data, the
tokenizer's saved chat template, `smallcoder chat`, `generate --chat`, the server, the evaluation
and the GGUF export), so they cannot drift apart. Standard library only.

Chat: `User: {request}\\nAssistant:`; the answer follows after one space and ends with EOS, and
earlier turns are kept as history, each answer closed by its EOS. A model that misses its EOS
starts the next turn, so an answer also ends at `CHAT_STOP` ("\\nUser:"), and the whitespace that
opens it is not part of it (`answer_text`, `AnswerStream`).

FIM (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle", as
StarCoder trains it): the model writes the middle after one of two orders of the same sentinels,
- PSM: `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>` + middle;
- SPM: `<fim_prefix><fim_suffix>{suffix}<fim_middle>{prefix}` + middle (the paper's SPM variant that
  StarCoder's Megatron loader uses: the middle continues the prefix directly, and a prefix that grows
  as the user types only appends to the prompt).
Evaluation and the server build both through `fim_prompt`, training data through its token-level
equivalent `fim_ids` (one layout table serves both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import SmallCoderError

EOS_TOKEN = "<|endoftext|>"
USER_PREFIX = "User: "
ASSISTANT_PREFIX = "Assistant:"
CHAT_STOP = "\nUser:"  # the card's next turn: a chat answer ends there even without EOS

# The same format as a Jinja template, so `transformers`' apply_chat_template and llama.cpp agree.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)  # the tokens a FIM prompt is built from
# StarCoder's other FIM-family tokens (repository-level prompts), named for runtimes such as llama.cpp
FIM_PAD, REPO_NAME, FILE_SEP = "<fim_pad>", "<reponame>", "<file_sep>"


def format_chat(messages: Sequence[dict[str, str]] | str, add_generation_prompt: bool = True,
                eos_token: str = EOS_TOKEN) -> str:
    """Render a conversation in the card's format (a plain string is one user turn)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise SmallCoderError(f"chat message {i}: must be a dict with 'role' and 'content', "
                                  f"got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise SmallCoderError(f"chat message {i}: 'content' must be a string, got {type(content).__name__}")
        if role == "system":
            parts.append(f"{content}\n")
        elif role == "user":
            parts.append(f"{USER_PREFIX}{content}\n")
        elif role == "assistant":
            parts.append(f"{ASSISTANT_PREFIX} {content}{eos_token}")
        else:
            raise SmallCoderError(f"chat message {i}: unknown role {role!r} (use system, user or assistant)")
    if add_generation_prompt:
        parts.append(ASSISTANT_PREFIX)
    return "".join(parts)


def chat_stops(stops: Sequence[str] = ()) -> tuple[str, ...]:
    """The stop strings of a chat answer: the caller's, then `CHAT_STOP` (once)."""
    stops = tuple(stops)
    return stops if CHAT_STOP in stops else (*stops, CHAT_STOP)


def answer_text(text: str) -> str:
    """A whole chat answer as shown: without the whitespace that follows "Assistant:"."""
    return text.lstrip()


class AnswerStream:
    """The same for an answer that arrives in pieces: call it on each piece, in order; pieces
    are stripped until the first one with text in it."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        return piece


# Each order as its sequence of parts: a sentinel (an index into FIM_TOKENS) or a piece's name.
# `fim_prompt` (text) and `fim_ids` (token ids) both read this table, so the two cannot differ.
_FIM_LAYOUTS = {"psm": (0, "prefix", 1, "suffix", 2, "middle"),
                "spm": (0, 1, "suffix", 2, "prefix", "middle")}
FIM_ORDERS = tuple(_FIM_LAYOUTS)


def _fim_layout(order: str) -> tuple[int | str, ...]:
    layout = _FIM_LAYOUTS.get(order)
    if layout is None:
        raise SmallCoderError(f"unknown FIM order {order!r}; choose one of: {', '.join(FIM_ORDERS)}")
    return layout


def fim_prompt(prefix: str, suffix: str, middle: str = "", order: str = "psm") -> str:
    """The fill-in-the-middle prompt in `order` (see the module docstring); `middle` is what is
    known of the middle already (an editor's text typed so far; a training example's whole middle)."""
    pieces = {"prefix": prefix, "suffix": suffix, "middle": middle}
    return "".join(FIM_TOKENS[p] if isinstance(p, int) else pieces[p] for p in _fim_layout(order))


def fim_ids(prefix: Sequence[int], suffix: Sequence[int], middle: Sequence[int], order: str,
            sentinel_ids: Sequence[int]) -> list[int]:
    """`fim_prompt` in token ids: the pieces' ids (each piece tokenized on its own, so the middle
    starts at a token boundary as it does after an editor's prompt) laid out in `order` around
    `sentinel_ids`, the ids of FIM_TOKENS in that order. Training data builds its examples here."""
    pieces = {"prefix": prefix, "suffix": suffix, "middle": middle}
    out: list[int] = []
    for p in _fim_layout(order):
        if isinstance(p, int):
            out.append(int(sentinel_ids[p]))
        else:
            out.extend(int(t) for t in pieces[p])
    return out


def fim_keep(extra: int, prefix: int, suffix: int, room: int) -> tuple[int, int, int]:
    """How many tokens of (extra context, prefix, suffix), of these lengths, a FIM prompt keeps
    within `room` tokens (the sentinels and the middle already counted out): of the prefix its end
    and of the suffix its start; when both do not fit, the suffix takes at most a quarter (llama.cpp's
    3:1, since the prefix says more about the hole) and either takes what the other leaves; the
    extra context (other files) gets what remains, its end kept. The one cut rule for FIM prompts."""
    if prefix + suffix <= room:
        keep_p, keep_s = prefix, suffix
    else:
        keep_s = min(suffix, max(room // 4, room - prefix))
        keep_p = min(prefix, room - keep_s)
    return min(extra, room - keep_p - keep_s), keep_p, keep_s


def fit_fim(prefix: str, suffix: str, tokenizer: Any, max_tokens: int, middle: str = "",
            order: str = "psm") -> tuple[str, str]:
    """(prefix, suffix) cut so that `fim_prompt(prefix, suffix, middle, order)` is at most
    `max_tokens` tokens, by `fim_keep`'s rule (the one the server's prompts are cut by): the start
    of the prefix and the end of the suffix go, so the text nearest the hole stays. Cuts fall on
    token boundaries (and whole characters), counted with `tokenizer.encode` / `decode`, for
    callers that keep prompts as text (the evaluation). Unchanged when the prompt fits."""
    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    if count(fim_prompt(prefix, suffix, middle, order)) <= max_tokens:
        return prefix, suffix
    room = max_tokens - count(fim_prompt("", "", middle, order))
    if room < 0:
        raise SmallCoderError(f"a FIM prompt needs at least {max_tokens - room} tokens (sentinels and the "
                              f"middle typed so far), more than the {max_tokens} it may have")
    p_ids, s_ids = tokenizer.encode(prefix), tokenizer.encode(suffix)
    _, keep_p, keep_s = fim_keep(0, len(p_ids), len(s_ids), room)
    while True:
        head, tail = _tail(prefix, p_ids, keep_p, tokenizer), _head(suffix, s_ids, keep_s, tokenizer)
        over = count(fim_prompt(head, tail, middle, order)) - max_tokens
        if over <= 0:  # a cut text can tokenize a little differently at its new edge: then cut more
            return head, tail
        if keep_p >= keep_s:
            keep_p = max(0, keep_p - over)
        else:
            keep_s = max(0, keep_s - over)


def _tail(text: str, ids: list[int], keep: int, tokenizer: Any) -> str:
    """The end of `text` made of its last `keep` tokens (fewer where a token splits a character)."""
    while keep > 0:
        piece = tokenizer.decode(ids[len(ids) - keep:])
        if text.endswith(piece):
            return piece
        keep -= 1
    return ""


def _head(text: str, ids: list[int], keep: int, tokenizer: Any) -> str:
    """The start of `text` made of its first `keep` tokens (fewer where a token splits a character)."""
    while keep > 0:
        piece = tokenizer.decode(ids[:keep])
        if text.startswith(piece):
            return piece
        keep -= 1
    return ""


def has_fim(tokenizer: Any) -> bool:
    """Whether `tokenizer` has each FIM token as a token of its own (else FIM prompts mean nothing)."""
    return all(tokenizer.token_to_id(t) is not None for t in FIM_TOKENS)


def fim_split(prompt: str) -> tuple[str, str, str, str] | None:
    """(head, prefix, suffix, middle) of a text prompt in the PSM shape `head<fim_prefix>prefix
    <fim_suffix>suffix<fim_middle>middle` (each sentinel once, in that order; an SPM prompt reads
    as one with an empty prefix), or None: what an editor that fills the template itself sends."""
    if any(prompt.count(t) != 1 for t in FIM_TOKENS):
        return None
    i, j, k = (prompt.index(t) for t in FIM_TOKENS)
    if not i < j < k:
        return None
    return (prompt[:i], prompt[i + len(FIM_PREFIX):j], prompt[j + len(FIM_SUFFIX):k],
            prompt[k + len(FIM_MIDDLE):])


# Repository-level context before a FIM prompt (llama.cpp's `/infill` `input_extra`, in the pattern
# of Qwen2.5-Coder, arXiv 2409.12186): with a repository token and a file separator in the
# vocabulary, `<repo>myproject\n`, each chunk as `<file_sep>{filename}\n{text}`, then
# `<file_sep>filename\n` (llama.cpp's literal name for the file being edited). Without both, each
# chunk's text follows llama.cpp's plain-text separator, without names: a repository token alone (the
# StarCoder vocabulary has `<reponame>` and no file separator) is a token the model never saw.
REPO_TOKENS = ("<repo_name>", "<|repo_name|>", REPO_NAME)
FILE_SEP_TOKENS = (FILE_SEP, "<|file_sep|>")
SNIPPET_SEP = "\n\n--- snippet ---\n\n"


def repo_tokens(tokenizer: Any) -> tuple[str, str] | None:
    """The (repository token, file separator) of `tokenizer`'s vocabulary, or None without both."""
    repo = next((t for t in REPO_TOKENS if tokenizer.token_to_id(t) is not None), None)
    sep = next((t for t in FILE_SEP_TOKENS if tokenizer.token_to_id(t) is not None), None)
    return (repo, sep) if repo and sep else None


def extra_context(chunks: Sequence[tuple[str, str]], tokens: tuple[str, str] | None) -> str:
    """The text before the FIM prompt for (filename, text) chunks: see above (`tokens` from
    `repo_tokens`). The repository pattern is written even without chunks, as llama.cpp does."""
    if tokens is None:
        return "".join(SNIPPET_SEP + text for _, text in chunks)
    repo, sep = tokens
    files = "".join(f"{sep}{name}\n{text}" for name, text in chunks)
    return f"{repo}myproject\n{files}{sep}filename\n"
