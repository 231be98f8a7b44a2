"""SFT formatting (the card's EOS fix), collation and loss normalisation.

One conversation is encoded through `encode_conversations([messages], ...)[0]`, the batch
encoder the packer uses (the one-conversation wrapper is gone); the loss denominator of a step's
micro-batches is the sum of their collated `num_loss_tokens` (what the trainer's validation loss
divides by; the loader's `Step.num_loss_tokens` is checked against it in test_mixture.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smallcoder import SmallCoderError, Tokenizer, format_chat, new_model
from smallcoder.data.sft import IGNORE_INDEX, collate, count_loss_tokens, encode_conversations

# Contents chosen to break naive piecewise encoding: trailing newlines and spaces (a whitespace
# run at a piece's end pre-tokenizes differently alone), leading spaces, digits, non-ASCII,
# emoji (a multi-token character), an empty answer, and special-token text inside content.
CONVERSATIONS = [
    [{"role": "user", "content": "Write add."}, {"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
    [{"role": "system", "content": "You are terse.  "}, {"role": "user", "content": "def f():\n    pass\n"},
     {"role": "assistant", "content": "  ok\n\n"}, {"role": "user", "content": "héllo wörld 123 😀\n"},
     {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "x" * 3 + " \n"}, {"role": "assistant", "content": "\n1234 <fim_prefix> done "},
     {"role": "user", "content": "<|endoftext|> again"}, {"role": "assistant", "content": ":) 😀😀"}],
]


@pytest.fixture(scope="module", params=["starcoder", "small"])
def tok(request, small_tokenizer) -> Tokenizer:
    if request.param == "small":
        return small_tokenizer
    return Tokenizer.load(request.getfixturevalue("starcoder_dir"))


def _segments(messages) -> list[tuple[str, int]]:
    """The rendered text cut at the mask boundaries: (text, trained?) pieces, built independently."""
    segs, prompt = [], ""
    for m in messages:
        if m["role"] == "assistant":
            segs += [(prompt + "Assistant:", 0), (f" {m['content']}<|endoftext|>", 1)]
            prompt = ""
        elif m["role"] == "user":
            prompt += f"User: {m['content']}\n"
        else:
            prompt += f"{m['content']}\n"
    return segs


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_ids_equal_whole_string_encoding_and_mask_equals_piecewise(tok, messages):
    ids, mask = encode_conversations([messages], tok)[0]
    assert ids == tok.encode(format_chat(messages, add_generation_prompt=False))
    # Piecewise: prompt pieces end with ':' and answers end with EOS, both pre-tokenizer
    # boundaries, so encoding each piece alone gives the same ids, and the mask is known per piece.
    piece_ids, piece_mask = [], []
    for text, trained in _segments(messages):
        part = tok.encode(text)
        piece_ids += part
        piece_mask += [trained] * len(part)
    assert piece_ids == ids
    assert piece_mask == mask


def test_prompt_masked_answer_and_eos_trained(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "hi there"}]
    ids, mask = encode_conversations([messages], tok)[0]
    trained = [i for i, m in zip(ids, mask) if m]
    masked = [i for i, m in zip(ids, mask) if not m]
    assert tok.decode(trained) == " hi there<|endoftext|>"
    assert tok.decode(masked) == "Be brief.\nUser: Say hi\nAssistant:"
    assert ids[-1] == tok.eos_id and mask[-1] == 1


def test_multi_turn_trains_both_answers_and_masks_both_users(tok):
    messages = CONVERSATIONS[2]
    ids, mask = encode_conversations([messages], tok)[0]
    runs, cur, cur_m = [], [], mask[0]
    for i, m in zip(ids, mask):
        if m != cur_m:
            runs.append((cur_m, tok.decode(cur)))
            cur, cur_m = [], m
        cur.append(i)
    runs.append((cur_m, tok.decode(cur)))
    assert runs == [(0, "User: xxx \n\nAssistant:"), (1, " \n1234 <fim_prefix> done <|endoftext|>"),
                    (0, "User: <|endoftext|> again\nAssistant:"), (1, " :) 😀😀<|endoftext|>")]
    assert sum(1 for i, m in zip(ids, mask) if m and i == tok.eos_id) == 2  # both closing EOS trained


def test_batch_encoder_matches_single(small_tokenizer):
    assert encode_conversations(CONVERSATIONS, small_tokenizer) == [
        encode_conversations([c], small_tokenizer)[0] for c in CONVERSATIONS]


def test_max_len_keeps_the_first_tokens(small_tokenizer):
    ids, mask = encode_conversations([CONVERSATIONS[1]], small_tokenizer)[0]
    short = encode_conversations([CONVERSATIONS[1]], small_tokenizer, max_len=7)[0]
    assert short == (ids[:7], mask[:7])
    with pytest.raises(SmallCoderError, match="max_len must be >= 1, got 0"):
        encode_conversations([CONVERSATIONS[1]], small_tokenizer, max_len=0)[0]


@pytest.mark.parametrize("messages, pattern", [
    ([{"role": "user", "content": "hi"}], r"message 0 has role 'user'; an SFT conversation must end with an assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
     "message 2 has role 'user'"),
    ([], "must be a non-empty list of messages"),
    ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}], "unknown role 'robot'"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "'content' must be a string"),
])
def test_bad_conversations_error(small_tokenizer, messages, pattern):
    with pytest.raises(SmallCoderError, match=pattern):
        encode_conversations([messages], small_tokenizer)[0]


def _record(ids, mask=None):
    return (np.asarray(ids, dtype=np.uint16), None if mask is None else np.asarray(mask, dtype=np.uint8))


def test_collate_keeps_final_eos_label_and_masks_padding_when_pad_is_eos():
    # ids: prompt 5 6 | answer 7 8 EOS(0); pad id is also 0
    rec = _record([5, 6, 7, 8, 0], [0, 0, 1, 1, 1])
    b = collate([rec], seq_len=8, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7, 8, 0, -100, -100, -100]]
    assert b["labels"][0, 4].item() == 0  # the answer's EOS is trained, not masked like the pads after it
    assert b["num_loss_tokens"] == 3
    assert all(b[k].dtype == torch.int64 for k in ("input_ids", "labels"))


def test_collate_packed_trains_every_token_and_cuts_long_records():
    packed = _record([3, 0, 4, 5])
    b = collate([packed, _record([9] * 10, [1] * 10)], seq_len=4, pad_id=0)
    assert b["labels"].tolist() == [[3, 0, 4, 5], [9, 9, 9, 9]]
    assert b["num_loss_tokens"] == 6  # position 0 of each row is never predicted


def test_collate_pad_to_multiple_of():
    b = collate([_record([1, 2, 3]), _record([1] * 5, [1] * 5)], seq_len=16, pad_id=0, pad_to_multiple_of=4)
    assert b["input_ids"].shape == (2, 8)
    b = collate([_record([1] * 15)], seq_len=16, pad_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (1, 16)


def test_collate_errors():
    with pytest.raises(SmallCoderError, match="record 1 has 3 ids but a loss mask of 2"):
        collate([_record([1, 2]), _record([1, 2, 3], [1, 1])], seq_len=4, pad_id=0)
    with pytest.raises(SmallCoderError, match="got no records"):
        collate([], seq_len=4, pad_id=0)
    with pytest.raises(SmallCoderError, match="seq_len must be >= 2, got 1"):
        collate([_record([1])], seq_len=1, pad_id=0)


def test_num_loss_tokens_equals_brute_force_count():
    rng = np.random.default_rng(0)
    records = []
    for _ in range(12):
        n = int(rng.integers(1, 40))
        ids = rng.integers(0, 50, n)
        records.append(_record(ids, None if rng.random() < 0.3 else rng.integers(0, 2, n)))
    seq_len = 32
    b = collate(records, seq_len=seq_len, pad_id=0)
    brute = 0
    for ids, mask in records:
        for t in range(1, min(len(ids), seq_len)):  # label t is predicted from position t - 1
            brute += 1 if mask is None else int(mask[t] == 1)
    assert b["num_loss_tokens"] == brute
    assert sum(count_loss_tokens(ids, mask, seq_len) for ids, mask in records) == brute
    assert sum(mb["num_loss_tokens"] for mb in (collate(records[:5], seq_len, 0), collate(records[5:], seq_len, 0))) \
        == brute


def test_gradient_accumulation_equals_whole_batch(micro_config, small_tokenizer):
    torch.manual_seed(0)
    model = new_model(micro_config, seed=3)
    records = [_record(*encode_conversations([c], small_tokenizer)[0]) for c in CONVERSATIONS]
    records.append(_record(np.arange(1, 30) % small_tokenizer.vocab_size))  # a packed record
    seq_len = 64

    whole = collate(records, seq_len, pad_id=0)
    model.zero_grad()
    full_loss = model(whole["input_ids"], labels=whole["labels"]) / whole["num_loss_tokens"]
    full_loss.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    ref = torch.nn.functional.cross_entropy(model(whole["input_ids"])[:, :-1].reshape(-1, micro_config.vocab_size),
                                            whole["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(full_loss, ref, atol=1e-5)  # = the mean over trained tokens

    micro = [collate(records[i:i + 1], seq_len, 0) for i in range(len(records))]
    total = sum(mb["num_loss_tokens"] for mb in micro)
    assert total == whole["num_loss_tokens"]
    model.zero_grad()
    acc = 0.0
    for mb in micro:
        loss = model(mb["input_ids"], labels=mb["labels"]) / total
        loss.backward()
        acc += loss.item()
    assert acc == pytest.approx(full_loss.item(), rel=1e-5)
    for p, g in zip(model.parameters(), full_grads):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)
    # Normalising each micro-batch by its own count instead gives a different (wrong) loss.
    wrong = sum(model(mb["input_ids"], labels=mb["labels"]).item() / mb["num_loss_tokens"] for mb in micro)
    assert wrong / len(micro) != pytest.approx(full_loss.item(), rel=1e-3)
