"""The chunked training loss equals cross_entropy over the full logits, in value and in gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smallcoder import ModelConfig, new_model
from smallcoder.data.sft import IGNORE_INDEX
from smallcoder.loss import next_token_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def case(seed: int = 0, B: int = 3, T: int = 11, H: int = 16, V: int = 50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    return hidden, weight, labels


def grads(fn, hidden, weight, labels, scale=1.0):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 4, 7, 33, 512])  # one row, uneven splits, one chunk
def test_matches_cross_entropy(chunk):
    hidden, weight, labels = case()
    want = grads(reference, hidden, weight, labels, scale=0.37)
    got = grads(lambda h, w, y: next_token_loss_sum(h, w, y, chunk=chunk), hidden, weight, labels, scale=0.37)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_gives_the_same_value_and_stores_nothing():
    hidden, weight, labels = case(1)
    with torch.no_grad():
        loss = next_token_loss_sum(hidden.requires_grad_(), weight, labels, chunk=5)
    torch.testing.assert_close(loss, reference(hidden.detach(), weight, labels))
    assert not loss.requires_grad


def test_all_ignored_is_zero_with_zero_gradients():
    hidden, weight, labels = case(2)
    labels[:] = IGNORE_INDEX
    loss, gh, gw = grads(next_token_loss_sum, hidden, weight, labels)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_bf16_autocast_matches_autocast_reference():
    hidden, weight, labels = case(3, H=32, V=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = grads(reference, hidden, weight, labels)
        got = grads(lambda h, w, y: next_token_loss_sum(h, w, y, chunk=8), hidden, weight, labels)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # fp32 master gradients
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_backward_twice_is_refused():
    hidden, weight, labels = case(4)
    loss = next_token_loss_sum(hidden.requires_grad_(), weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already ran once"):
        loss.backward()


def test_shape_mismatch_is_named():
    hidden, weight, labels = case(5)
    with pytest.raises(ValueError, match=r"labels have shape \(3, 10\), hidden states \(3, 11\)"):
        next_token_loss_sum(hidden, weight, labels[:, :10])


@pytest.mark.parametrize("tied", [False, True])
def test_model_labels_path_matches_logits_path(tied):
    config = ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 12:] = IGNORE_INDEX
    runs = []
    for use_labels in (False, True):
        model = new_model(config, seed=0)
        if use_labels:
            loss = model(ids, labels=labels)
        else:
            logits = model(ids)[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, 97), labels[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = runs
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_model_labels_path_refuses_cache_and_last_only(micro_config):
    from smallcoder.model import KVCache

    model = new_model(micro_config, seed=0)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no cache, no last_only"):
        model(ids, labels=ids, last_only=True)
    with pytest.raises(ValueError, match="no cache, no last_only"):
        model(ids, cache=KVCache(micro_config, 1, 8), labels=ids)


def test_compiled_model_trains_the_same(micro_config):
    """torch.compile (the trainer's run.compile) runs the layers compiled and the loss eagerly."""
    ids = torch.randint(0, micro_config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    out = []
    for compiled in (False, True):
        model = new_model(micro_config, seed=0)
        fwd = torch.compile(model) if compiled else model
        loss = fwd(ids, labels=ids)
        loss.backward()
        out.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[1][1], out[0][1]):  # compiled kernels sum in another order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
