"""Shared fixtures: everything small and made here, except the data under ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SMALLCODER_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def one_thread():
    """Micro models gain nothing from intra-op threads on a shared 2-core machine (threads only
    spin-wait there); restored after the module. Use with `pytestmark = usefixtures(...)`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set SMALLCODER_DATA to its path)")
    return SHARED_DATA


def program(text: str, **values: object) -> str:
    """Dedent a test program and fill @NAME@ placeholders with repr(value) (braces stay literal Python)."""
    import textwrap

    text = textwrap.dedent(text).lstrip("\n")
    for name, value in values.items():
        text = text.replace(f"@{name}@", repr(value))
    return text


@pytest.fixture(scope="session")
def humaneval_problems(shared_data: Path) -> list[dict]:
    from smallcoder.eval.data import load_task_data

    return load_task_data("humaneval", shared_data)


@pytest.fixture(scope="session")
def mbpp_records(shared_data: Path) -> list[dict]:
    from smallcoder.eval.data import load_task_data

    return load_task_data("mbpp", shared_data)


@pytest.fixture(scope="session")
def plus_problems(shared_data: Path) -> list[dict]:
    from smallcoder.eval.data import load_task_data

    return load_task_data("humaneval_plus", shared_data)


@pytest.fixture(scope="session")
def starcoder_dir(shared_data: Path) -> Path:
    path = shared_data / "tokenizers" / "starcoder"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"{path}/tokenizer.json is absent")
    return path


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A byte-level BPE with <|endoftext|> = 0, trained here on a few lines of code and prose."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from smallcoder import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<fim_prefix>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["def add(a, b):\n    return a + b\n", "User: hello there\nAssistant: hi, how are you?",
            "The quick brown fox jumps over the lazy dog. ", "for i in range(10):\n    print(i)\n"] * 20
    backend.train_from_iterator(text, trainer)
    folder = tmp_path_factory.mktemp("small_tokenizer")
    backend.save(str(folder / "tokenizer.json"))
    return Tokenizer.load(folder)


@pytest.fixture(scope="session")
def micro_config(small_tokenizer):
    from smallcoder import ModelConfig

    return ModelConfig(vocab_size=small_tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                       max_position_embeddings=128, initializer_range=0.2)


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory, micro_config, small_tokenizer) -> Path:
    """A saved micro model (random weights with a wide init, so greedy choices are decisive)."""
    from smallcoder import new_model, save

    folder = tmp_path_factory.mktemp("ckpt") / "micro"
    save(new_model(micro_config, seed=1), small_tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def fim_checkpoint(tmp_path_factory, micro_config) -> Path:
    """A micro model whose byte-level BPE has the StarCoder FIM tokens as special tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    import smallcoder

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20,
                                trainer)
    folder = tmp_path_factory.mktemp("fim")
    backend.save(str(folder / "tokenizer.json"))
    tok = smallcoder.Tokenizer.load(folder)
    config = micro_config.replace(vocab_size=tok.vocab_size)
    smallcoder.save(smallcoder.new_model(config, seed=2), tok, folder / "model")
    return folder / "model"


# ------------------------------------------------------------------ the C++ kernel's int8 arithmetic

def q8_range(K: int) -> int:
    """The kernel's largest |q| for rows of K values: K x Q x 127 stays within int32."""
    return min(32767, (2 ** 31 - 1) // (K * 127))


def q8_rows(x):
    """(q (..., K), d (..., 1)) as the kernel's int8 path quantizes a matmul input, op for op in
    fp32: one scale per row, d = max|x| / Q, q = round-half-even(x * (Q / max|x|)), Q = q8_range(K)."""
    import torch

    Q = float(q8_range(x.shape[-1]))
    amax = x.float().abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, Q / amax, torch.zeros_like(amax))
    return torch.round(x.float() * inv).clamp(-Q, Q), amax / Q


def q8_linear(layer, x):
    """An Int8Linear's output as the kernel computes it: the exact integer row sums (float64 holds
    them exactly) times the activation row's scale, times the weight row's scale."""
    q, d = q8_rows(x)
    sums = q.double() @ layer.weight.double().t()
    return (sums * d.double() * layer.weight_scale.double()).float()


@pytest.fixture(scope="session")
def int8_emulation():
    """A function: int8 model -> a deep copy whose int8 layers compute in PyTorch what the C++
    kernel's int8 path computes (csrc/q8dot.h), so tests can hold the kernel to it tightly."""
    import copy
    import functools

    from smallcoder.quant import Int8Linear

    def emulate(model):
        twin = copy.deepcopy(model)
        for module in twin.modules():
            if isinstance(module, Int8Linear):
                module.forward = functools.partial(q8_linear, module)
        return twin

    return emulate
