"""The int8 quality guard (benchmarks/int8_quality.py): its measures and its exit status, on the micro model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "int8_quality.py"

WIKITEXT = (" \n = Alpha Beta = \n \n Alpha Beta is a 2004 film , directed by a man from the city . \n"
            " It was shown in 12 @,@ 000 theatres . \n \n = = Plot = = \n \n"
            " The plot follows a fox and a dog . \n \n = Gamma = \n \n Gamma is a letter ; it follows beta . \n")


@pytest.fixture(scope="module")
def guard():
    spec = importlib.util.spec_from_file_location("int8_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their string annotations through it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    (folder / "wikitext-2").mkdir()
    (folder / "wikitext-2" / "wiki.test.raw").write_text(WIKITEXT, encoding="utf-8")
    return folder


def test_prompt_set_is_fixed_and_mixed(guard):
    prompts = guard.prompt_set()
    assert len(prompts) == 40 and len({p for _, p in prompts}) == 40
    assert {k for k, _ in prompts} == {"chat", "code", "prose"}
    chat = [p for k, p in prompts if k == "chat"]
    assert all(p.startswith("User: ") and p.endswith("\nAssistant:") for p in chat)


def test_free_running_counts_only_the_prefix_before_the_first_divergence(guard):
    # the second prompt matches again after diverging at index 1: those later matches do not count
    fr = guard.free_running([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9]], [[1, 2, 3, 4], [5, 0, 7, 8], [0, 9]])
    assert (fr.tokens, fr.prefix_tokens, fr.identical, fr.prompts) == (10, 5, 1, 3)
    assert fr.first_divergence == [None, 1, 0]
    assert fr.prefix_share == pytest.approx(0.5)
    assert guard.free_running([[1, 2, 3]], [[1, 2]]).identical == 0  # a shorter completion is not identical


def test_teacher_forced_agreement_is_total_for_one_model_and_not_for_another(guard, micro_checkpoint, micro_config):
    from smallcoder import Engine, kernels, load, new_model

    model, tok = load(micro_checkpoint)
    prompts = [tok.encode("def add(a, b):\n"), tok.encode("User: hello\nAssistant:")]
    conts = guard.generate_ids(Engine(model, tok), prompts, 12)
    same = guard.teacher_forced(model, model, prompts, conts, tok.eos_id)
    assert (same.positions, same.agree, same.self_consistent) == (24, 24, 24)
    assert same.mean_kl == pytest.approx(0.0, abs=1e-6) and same.disagree_margins == []
    kernel = kernels.build(model)
    if kernel is not None:  # the decode-step logits line up with the forward's positions
        stepped = guard.teacher_forced(model, model, prompts, conts, tok.eos_id, decode_kernel=kernel)
        assert (stepped.positions, stepped.agree) == (24, 24) and stepped.mean_kl == pytest.approx(0.0, abs=1e-6)
    other = new_model(micro_config, seed=7).eval()
    diff = guard.teacher_forced(model, other, prompts, conts, tok.eos_id)
    assert diff.agreement < 0.9 and diff.mean_kl > 0.01
    assert len(diff.disagree_margins) == diff.positions - diff.agree


def _run(guard, capsys, *argv: str) -> tuple[int, str]:
    rc = guard.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_guard_end_to_end_and_exit_status(guard, micro_checkpoint, data_dir, tmp_path, capsys):
    base = ["--model", str(micro_checkpoint), "--data-dir", str(data_dir), "--num-prompts", "4",
            "--new-tokens", "8", "--threads", "1"]
    rc, out = _run(guard, capsys, *base, "--json", str(tmp_path / "r.json"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert rc == (0 if r["passed"] else 1)
    assert r["prompts"]["count"] == 4 and r["teacher_forced"]["positions"] == 32
    assert r["checkpoint"]["saved_logits_identical"] and r["checkpoint"]["saved_state_dict_identical"]
    assert r["checkpoint"]["int8_weights"] < r["checkpoint"]["float_weights"]
    w = r["wikitext2"]
    assert w["float32"]["documents"] == 2 and w["int8"]["words"] == w["float32"]["words"]
    assert w["word_ppl_rise"] == pytest.approx(w["int8"]["word_perplexity"] / w["float32"]["word_perplexity"] - 1)
    assert "teacher-forced top-1 agreement (gated)" in out and "applies to teacher-forced" in out

    # an unreachable target fails the run with status 1 and names it
    rc, out = _run(guard, capsys, *base, "--skip-wikitext", "--min-agreement", "1.01")
    assert rc == 1 and "FAIL: teacher-forced agreement" in out
    rc, out = _run(guard, capsys, *base, "--skip-wikitext", "--min-agreement", "0", "--min-kernel-agreement", "0",
                   "--max-kl", "0")
    assert rc == 1 and out.splitlines()[-1] == "verdict: FAIL: mean KL"
    if r["kernel_decode"] is not None:  # the C++ kernel's decode steps are measured and gated too
        assert r["kernel_decode"]["positions"] == 32 and r["kernel_decode"]["int8_path"] in out
        rc, out = _run(guard, capsys, *base, "--skip-wikitext", "--min-agreement", "0",
                       "--min-kernel-agreement", "1.01")
        assert rc == 1 and out.splitlines()[-1] == "verdict: FAIL: kernel decode agreement"
    rc, out = _run(guard, capsys, *base, "--num-prompts", "1", "--max-ppl-rise", "-1")
    assert rc == 1 and "wikitext-2 perplexity rise" in out.splitlines()[-1]


def test_guard_refuses_bad_input(guard, micro_checkpoint, tmp_path, capsys):
    from smallcoder import load, save

    rc, out = _run(guard, capsys, "--model", str(tmp_path / "missing"), "--skip-wikitext")
    assert rc == 2 and "missing" in out
    model, tok = load(micro_checkpoint, dtype="int8")
    save(model, tok, tmp_path / "q")
    rc, out = _run(guard, capsys, "--model", str(tmp_path / "q"), "--skip-wikitext")
    assert rc == 2 and "quantization_config" in out
    rc, out = _run(guard, capsys, "--model", str(micro_checkpoint), "--skip-wikitext", "--new-tokens", "200")
    assert rc == 2 and "context of 128 tokens" in out
