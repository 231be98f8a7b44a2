"""The mixture loader: determinism, weights, resume, rank slicing, token counts, validation, real packs.

The loader has no token budget or iterator protocol (the trainer fixes a stage's step count
before it starts and calls `next_step()`); collated batches carry no attention mask (padding is
found by position), so real-token counts are checked against the records' lengths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smallcoder import SmallCoderError
from smallcoder.data.mixture import Component, MixtureLoader, RecordDataset
from smallcoder.data.sft import IGNORE_INDEX


class MemDataset:
    """In-memory records whose every token is a tag = 1000 * component + index (so batches show their source)."""

    def __init__(self, comp: int, n: int, kind: str = "sft", seq_len: int = 16, seed: int = 0) -> None:
        self.kind, self.seq_len = kind, seq_len
        rng = np.random.default_rng(seed + comp)
        self.records = []
        for i in range(n):
            length = seq_len if kind == "packed" else int(rng.integers(2, seq_len + 1))
            ids = np.full(length, 1000 * comp + i, dtype=np.uint16)
            mask = None if kind == "packed" else rng.integers(0, 2, length).astype(np.uint8)
            self.records.append((ids, mask))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        return self.records[i]


def _components(sizes=(50, 30), weights=(0.6, 0.4), kinds=("sft", "packed"), seq_len=16):
    return [Component(f"c{k}", MemDataset(k, n, kind, seq_len), w)
            for k, (n, w, kind) in enumerate(zip(sizes, weights, kinds))]


def _loader(components=None, **kw) -> MixtureLoader:
    args = {"seq_len": 16, "global_batch": 8, "micro_batch": 2, "seed": 7, "pad_id": 0}
    args.update(kw)
    return MixtureLoader(components if components is not None else _components(), **args)


def _real_tokens(loader: MixtureLoader, step) -> int:
    """This rank's real (non-pad) tokens in `step`: its records' lengths, cut at seq_len."""
    datasets = {c.name: c.dataset for c in loader.components}
    return sum(min(len(datasets[name][i][0]), loader.seq_len) for name, i in step.records)


def _tags(step) -> list[int]:
    """The record tag of each row in this rank's micro-batches, in order."""
    return [int(row[0]) for mb in step.micro_batches for row in mb["input_ids"]]


def _run(loader: MixtureLoader, n: int) -> list[list[int]]:
    return [_tags(loader.next_step()) for _ in range(n)]


def test_mem_dataset_fits_protocol():
    assert isinstance(MemDataset(0, 3), RecordDataset)


def test_same_seed_same_batches_different_seed_different():
    a, b, c = _run(_loader(), 10), _run(_loader(), 10), _run(_loader(seed=8), 10)
    assert a == b
    assert a != c


def test_rows_match_records_and_batches_are_collated():
    loader = _loader()
    step = loader.next_step()
    assert len(step.micro_batches) == 4 and all(mb["input_ids"].shape == (2, 16) for mb in step.micro_batches)
    assert _tags(step) == [1000 * int(name[1:]) + i for name, i in step.records]
    assert step.num_loss_tokens == sum(mb["num_loss_tokens"] for mb in step.micro_batches)
    assert step.tokens == _real_tokens(loader, step)
    assert step.step == 1 and step.tokens_seen == step.tokens


def test_weights_realised():
    loader = _loader(_components(sizes=(200, 100)), global_batch=16, micro_batch=16)
    for _ in range(400):  # 6,400 draws: the share's standard error is about 0.006
        loader.next_step()
    mix = loader.mixture()
    assert mix["c0"]["records"] + mix["c1"]["records"] == 6400
    assert mix["c0"]["record_share"] == pytest.approx(0.6, abs=0.025)
    assert mix["c1"]["record_share"] == pytest.approx(0.4, abs=0.025)
    assert mix["c0"]["epoch"] >= 15  # 200 records drawn ~3,840 times: many re-shuffled epochs


def test_each_epoch_is_a_permutation_and_reshuffles():
    loader = _loader([Component("only", MemDataset(0, 24), 1.0)], global_batch=8, micro_batch=8)
    seen = [t for _ in range(6) for t in _tags(loader.next_step())]  # two epochs of 24
    assert sorted(seen[:24]) == list(range(24)) and sorted(seen[24:]) == list(range(24))
    assert seen[:24] != seen[24:]


def test_resume_equals_uninterrupted_run():
    k, m = 7, 9
    straight = _loader()
    expected = _run(straight, k + m)[k:]
    first = _loader()
    _run(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # saved with the checkpoint as JSON
    assert state["step"] == k and set(state["components"]) == {"c0", "c1"}
    resumed = _loader()
    resumed.load_state_dict(state)
    steps = [resumed.next_step() for _ in range(m)]
    assert [_tags(s) for s in steps] == expected
    assert steps[0].step == k + 1
    assert resumed.mixture() == straight.mixture()
    # ... also on another number of ranks: the global batch does not depend on the world size
    halves = []
    for rank in range(2):
        r = _loader(rank=rank, world_size=2)
        r.load_state_dict(state)
        halves.append(_run(r, m))
    assert [a + b for a, b in zip(*halves)] == expected


def test_ranks_are_disjoint_and_together_the_global_batch():
    big = (500, 300)  # no epoch ends within these steps (at an epoch's end a record may come twice)
    single = _loader(_components(sizes=big), global_batch=16, micro_batch=4)
    ranks = [_loader(_components(sizes=big), global_batch=16, micro_batch=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):
        whole = single.next_step()
        parts = [r.next_step() for r in ranks]
        assert parts[0].records + parts[1].records == whole.records
        assert not set(parts[0].records) & set(parts[1].records)
        for p in parts:
            assert len(p.micro_batches) == 2  # 16 / 2 ranks / micro 4
            assert p.num_loss_tokens == whole.num_loss_tokens  # global on every rank
            assert p.tokens == whole.tokens
        for key in ("input_ids", "labels"):
            rank_rows = [mb[key] for p in parts for mb in p.micro_batches]
            whole_rows = [mb[key] for mb in whole.micro_batches]
            assert len(rank_rows) == len(whole_rows) == 4
            assert all((a == b).all() for a, b in zip(rank_rows, whole_rows))
        assert sum(mb["num_loss_tokens"] for p in parts for mb in p.micro_batches) == whole.num_loss_tokens


def test_packed_steps_count_tokens_and_trained_labels():
    comps = [Component("p", MemDataset(0, 40, "packed"), 1.0)]
    loader = _loader(comps)  # packed: 128 tokens a step
    steps = [loader.next_step() for _ in range(4)]
    assert steps[-1].tokens_seen == 512 and loader.state_dict()["tokens_seen"] == 512
    assert all(s.num_loss_tokens == 8 * 15 for s in steps)  # packed rows train all but position 0


@pytest.mark.parametrize("make, pattern", [
    (lambda: _loader([]), "needs at least one component"),
    (lambda: _loader(_components(weights=(0.6, 0.5))), r"weights must sum to 1 \(within 1e-6\), got 1.1 \(c0=0.6, c1=0.5\)"),
    (lambda: _loader(_components(weights=(1.2, -0.2))), r"component 'c1': weight must be a positive number, got -0.2"),
    (lambda: _loader(_components(weights=(1.0, 0.0))), r"component 'c1': weight must be a positive number, got 0.0"),
    (lambda: _loader([Component("a", MemDataset(0, 3), 0.5), Component("a", MemDataset(1, 3), 0.5)]),
     "component 'a': duplicate name"),
    (lambda: _loader([Component("e", MemDataset(0, 0), 1.0)]), r"component 'e': dataset is empty \(0 records\)"),
    (lambda: _loader([Component("p", MemDataset(0, 4, "packed", seq_len=32), 1.0)]),
     "component 'p': packed records hold seq_len 32 tokens but the loader's seq_len is 16"),
    (lambda: _loader([Component("s", MemDataset(0, 4, "sft", seq_len=32), 1.0)]),
     "component 's': SFT records run up to 32 tokens but the loader's seq_len is 16"),
    (lambda: _loader(global_batch=10, micro_batch=2, world_size=2),
     "global_batch 10 is not divisible by world_size 2 x micro_batch 2 = 4"),
    (lambda: _loader(rank=2, world_size=2), "rank 2 is outside world_size 2"),
])
def test_validation_errors(make, pattern):
    with pytest.raises(SmallCoderError, match=pattern):
        make()


@pytest.mark.parametrize("kw, pattern", [
    ({"micro_batch": 0}, "mixture loader: micro_batch must be a positive integer, got 0"),
    ({"seq_len": 1}, "mixture loader: seq_len must be an integer >= 2, got 1"),
    ({"seed": -1}, "mixture loader: seed must be an integer >= 0, got -1"),
    ({"global_batch": True}, "mixture loader: global_batch must be a positive integer, got True"),
    ({"global_batch": 8.0}, "mixture loader: global_batch must be a positive integer, got 8.0"),
])
def test_integer_arguments_are_checked_by_name(kw, pattern):
    with pytest.raises(SmallCoderError, match=pattern):
        _loader(**kw)
    assert _loader(seed=np.int64(7)).next_step().step == 1  # numpy integers are integers


def test_load_state_validation():
    state = _loader().state_dict()
    other_names = _loader([Component("x", MemDataset(0, 50), 0.6), Component("c1", MemDataset(1, 30), 0.4)])
    with pytest.raises(SmallCoderError, match=r"components \['c0', 'c1'\] do not match this loader's \['c1', 'x'\]"):
        other_names.load_state_dict(state)
    with pytest.raises(SmallCoderError, match="component 'c0': size was 50 records, now 51"):
        _loader(_components(sizes=(51, 30))).load_state_dict(state)
    with pytest.raises(SmallCoderError, match="seed is 7 but this loader has 8"):
        _loader(seed=8).load_state_dict(state)
    with pytest.raises(SmallCoderError, match="component 'c0': weight was 0.6, now 0.5"):
        _loader(_components(weights=(0.5, 0.5))).load_state_dict(state)
    bad = json.loads(json.dumps(state))
    bad["components"]["c1"]["cursor"] = 31
    with pytest.raises(SmallCoderError, match="component 'c1': epoch 0 / cursor 31 out of range for 30 records"):
        _loader().load_state_dict(bad)
    with pytest.raises(SmallCoderError, match="version 99 is not supported"):
        _loader().load_state_dict({**state, "version": 99})


def test_real_token_datasets(tmp_path, small_tokenizer):
    """pack_texts + pack_examples -> TokenDataset -> the loader: the answer's final EOS keeps its label."""
    pack = pytest.importorskip("smallcoder.data.pack")
    from smallcoder.data.sft import encode_conversations

    seq_len = 32
    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(60)]
    pack.pack_texts(texts, small_tokenizer, tmp_path / "pre", seq_len=seq_len, progress=False)
    convs = [[{"role": "user", "content": f"add {i}"}, {"role": "assistant", "content": f"x + {i}"}] for i in range(20)]
    examples = encode_conversations(convs, small_tokenizer)
    pack.pack_examples(examples, small_tokenizer, tmp_path / "sft", max_len=seq_len, progress=False)
    pre, sft = pack.TokenDataset(tmp_path / "pre"), pack.TokenDataset(tmp_path / "sft")
    loader = MixtureLoader([Component("pre", pre, 0.5), Component("sft", sft, 0.5)], seq_len=seq_len,
                           global_batch=8, micro_batch=4, seed=0, pad_id=small_tokenizer.eos_id)
    eos = small_tokenizer.eos_id
    for _ in range(3):
        step = loader.next_step()
        rows = [(mb, b) for mb in step.micro_batches for b in range(mb["input_ids"].shape[0])]
        for (name, i), (mb, b) in zip(step.records, rows):
            ids, labels = mb["input_ids"][b], mb["labels"][b]
            if name == "pre":
                assert len(pre[i][0]) == seq_len and (labels == ids).all()
            else:
                want_ids, want_mask = examples[i]
                n = len(want_ids)
                assert ids[:n].tolist() == want_ids and len(sft[i][0]) == n
                assert labels[n - 1].item() == eos  # the closing EOS is trained ...
                assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == eos).all()  # ... the pads (also EOS) not
                assert [int(x != IGNORE_INDEX) for x in labels[:n]] == want_mask
