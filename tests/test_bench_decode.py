"""benchmarks/decode.py's decode rate: paired rounds, and never a rate from a non-positive
difference (a noisy run once printed 127,000,000,000 tok/s from t(128) - t(1) <= 0)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"


def _script(path: Path, name: str):
    """Import a benchmark script as module `name` (registered there while in use: dataclasses look
    their module up in sys.modules); a generator, unregistered when it resumes."""
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def decode_rate():
    for module in _script(SCRIPT, "bench_decode"):
        yield module.decode_rate


def test_rate_is_the_median_of_the_positive_paired_differences(decode_rate):
    # rounds: t(1), t(128); the second round's difference is negative and left out
    assert decode_rate([1.0, 1.0, 1.0, 1.0], [2.27, 0.5, 3.54, 2.27], 128) == pytest.approx(127 / 1.27)


def test_no_positive_difference_gives_no_rate(decode_rate):
    assert decode_rate([1.0, 2.0], [1.0, 1.5], 128) is None
    assert decode_rate([], [], 128) is None


# ---- benchmarks/spec_workload.py: the speculative table's rename and pinning ---------------------

WORKLOAD = SCRIPT.parent / "spec_workload.py"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sw():
    yield from _script(WORKLOAD, "spec_workload")


PROGRAM = '''\
import math

LIMIT = 3


def helper(x):
    return x * LIMIT


def score(numbers, n=2, scale=1.0):
    """Sum of the n largest, scaled; numbers is not changed."""
    total_sum = 0
    best = sorted(numbers, key=lambda v: -v)[:n]
    for i, value in enumerate(best):
        total_sum += helper(value) + i
    def shifted(d):
        return total_sum + d + len(best)
    squares = [k * k for k in best]
    return shifted(math.floor(scale)) + sum(squares) + max(numbers) + helper(x=1)
'''


def test_rename_gives_valid_python_that_differs_and_behaves_alike(sw):
    new, mapping = sw.rename_locals(PROGRAM)
    assert new != PROGRAM
    # locals and arguments renamed; globals, functions, builtins, imports and keyword names kept
    assert {"numbers", "n", "total_sum", "best", "i", "value", "d", "k", "v"} <= set(mapping)
    assert not {"LIMIT", "helper", "score", "math", "sorted", "max", "key", "x"} & set(mapping)
    assert "def score(numbers_arg, count=2, scale_arg=1.0):" in new and "totalSum += helper(value_var) + index" in new
    assert "helper(x=1)" in new and "key=lambda entry: -entry" in new
    assert '"""Sum of the n largest, scaled; numbers is not changed."""' in new  # text is not code
    old_ns, new_ns = {}, {}
    exec(compile(PROGRAM, "old", "exec"), old_ns)  # noqa: S102 - the test's own program
    exec(compile(new, "new", "exec"), new_ns)  # noqa: S102
    for args in (([3, 1, 2],), ([5, -1, 7, 2], 3, 2.5), ([0.5], 1, 3.0)):
        assert new_ns["score"](*args) == old_ns["score"](*args)


def test_rename_leaves_a_name_that_is_also_read_as_a_global(sw):
    src = "count = 1\n\ndef f(a):\n    count = a\n    return count\n\ndef g():\n    return count\n"
    new, mapping = sw.rename_locals(src)
    assert "count" not in mapping and mapping == {"a": "first"}
    assert "def f(first):\n    count = first\n" in new


def _items(sw, tok):
    code = "def add(a, b):\n    total = a + b\n    return total\n"
    items = []
    for k in range(3):
        prompt = f"# {k}\n" + code * 2
        answer = code.replace("total", "result") * (k + 1)
        items.append(sw.Item(str(k), prompt, answer, tok.encode(prompt), tok.encode(answer)))
    return items


@pytest.mark.parametrize("speculative", [None, "lookup"])
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize(("max_batch", "int8"), [(1, False), (3, True)])
def test_pinned_model_greedy_output_is_the_answer_through_the_engine(sw, micro_config, small_tokenizer,
                                                                     speculative, use_kernel, max_batch, int8):
    from smallcoder import Engine, SamplingParams, new_model
    from smallcoder.quant import quantize_model

    tok = small_tokenizer
    model = new_model(micro_config.replace(max_position_embeddings=512), seed=1).eval()
    model = sw.pin_model(quantize_model(model).eval() if int8 else model)
    items = _items(sw, tok)
    model.pins = sw.Pins(items, tok.eos_id)
    engine = Engine(model, tok, max_batch=max_batch, prefix_cache=False, speculative=speculative,
                    use_kernel=use_kernel)
    requests = [engine.submit(it.prompt_ids, SamplingParams(max_new_tokens=len(it.answer_ids) + 1)) for it in items]
    engine.run(requests)
    for it, r in zip(items, requests):
        c = r.result()
        sw.check_completion(it, c.token_ids, c.text, "engine")
        assert c.finish_reason == "stop"  # the pinned EOS after the answer
    if speculative:
        assert engine.accepted_tokens > 0  # the answers repeat: lookup drafts are kept

    model.pins = None  # unpinned, the random model says something else
    plain = Engine(model, tok, prefix_cache=False).generate([items[0].prompt_ids],
                                                            SamplingParams(max_new_tokens=len(items[0].answer_ids)))
    assert plain[0].token_ids != items[0].answer_ids
    model.pins = sw.Pins(items[1:], tok.eos_id)  # a prompt that is no pinned item's: a loud failure
    with pytest.raises(sw.PinError, match="begins like no pinned item"):
        Engine(model, tok, prefix_cache=False).generate([items[0].prompt_ids], SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize("lookup", [False, True])
def test_transformers_pin_gives_the_answer(sw, micro_checkpoint, small_tokenizer, lookup):
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    tok = small_tokenizer
    model = AutoModelForCausalLM.from_pretrained(micro_checkpoint, dtype=torch.float32).eval()
    it = _items(sw, tok)[1]
    ids = torch.tensor([it.prompt_ids])
    pin = LogitsProcessorList([sw.PinLogits(ids.shape[1], [it.answer_ids], tok.eos_id)])
    kw = {"prompt_lookup_num_tokens": 10} if lookup else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(it.answer_ids) + 1,
                         do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id, logits_processor=pin, **kw)
    assert out[0, ids.shape[1]:].tolist() == it.answer_ids + [tok.eos_id]


def test_llama_pin_counts_its_calls(sw):
    import numpy as np

    pin = sw.llama_pin([5, 7], eos_id=0)
    picks = [int(pin(np.arange(n), np.zeros(10, dtype=np.float32)).argmax()) for n in (3, 9, 9, 4)]
    assert picks == [5, 7, 0, 0]  # whatever it is shown (drafts included), call k pins answer[k], then EOS
