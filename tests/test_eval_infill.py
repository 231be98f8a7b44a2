"""HumanEval-infilling: the data, the canonical middles (all of Light, a fixed sample of each split),
empty middles, the stop rules, PSM/SPM prompts cut to the context, exact match, and bad input.

The full canonical check of the four files (8,652 sandboxed programs) is benchmarks/infill_canonical.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from smallcoder import SmallCoderError
from smallcoder.cli import main
from smallcoder.eval.data import INFILL_SPLITS, load_task_data
from smallcoder.inference import Completion
from smallcoder.prompts import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, fim_prompt, fit_fim

COUNTS = {"humaneval_infill_single": 1033, "humaneval_infill_multi": 5815, "humaneval_infill_span": 1640,
          "humaneval_infill_span_light": 164}
# a fixed sample of each big split for the unit suite: every k-th task
STRIDES = {"humaneval_infill_single": 25, "humaneval_infill_multi": 125, "humaneval_infill_span": 40}


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def splits(shared_data) -> dict[str, list[dict]]:
    return {task: load_task_data(task, shared_data) for task in INFILL_SPLITS}


# ---------------------------------------------------------------- the data


def test_counts_fields_and_what_the_middles_look_like(splits):
    assert {t: len(v) for t, v in splits.items()} == COUNTS
    for rows in splits.values():
        assert set(rows[0]) == {"task_id", "entry_point", "prompt", "suffix", "canonical_solution", "test"}
        assert len({r["task_id"] for r in rows}) == len(rows)
    # every single-line middle is one whole line with its newline: the first-newline stop keeps it
    assert all(r["canonical_solution"].endswith("\n") and r["canonical_solution"].count("\n") == 1
               for r in splits["humaneval_infill_single"])
    empty = {t: sum(r["canonical_solution"] == "" for r in rows) for t, rows in splits.items()}
    blank = {t: sum(r["canonical_solution"] != "" and not r["canonical_solution"].strip() for r in rows)
             for t, rows in splits.items()}
    assert empty == {**dict.fromkeys(COUNTS, 0), "humaneval_infill_span": 14}
    assert blank == {**dict.fromkeys(COUNTS, 0), "humaneval_infill_span": 37}


def test_hub_fallback_reads_the_same_file(monkeypatch, tmp_path, shared_data):
    """Without a local file the split's JSONL comes from the Hub dataset repo (served here from a copy)."""
    import huggingface_hub

    src = shared_data / "humaneval-infilling" / "HumanEval-RandomSpanInfillingLight.jsonl.gz"
    copy = tmp_path / "hub.jsonl"
    copy.write_bytes(gzip.decompress(src.read_bytes()))
    calls = []

    def fake_download(repo_id, filename, repo_type=None, **kw):
        calls.append((repo_id, filename, repo_type))
        return str(copy)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    rows = load_task_data("humaneval_infill_span_light", tmp_path / "empty")
    assert rows == load_task_data("humaneval_infill_span_light", shared_data)
    assert calls == [("loubnabnl/humaneval_infilling", "data/HumanEval-RandomSpanInfillingLight.jsonl", "dataset")]

    def offline(*a, **kw):
        raise OSError("We have no connection (LocalEntryNotFoundError)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SmallCoderError) as e:
        load_task_data("humaneval_infill_single", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "humaneval-infilling" / "HumanEval-SingleLineInfilling.jsonl.gz") in msg
    assert "--data-dir" in msg and "loubnabnl/humaneval_infilling" in msg and "no connection" in msg


# ---------------------------------------------------------------- canonical middles score 100%


def test_light_canonical_middles_score_164_of_164(capsys, tmp_path, splits, shared_data):
    rows = [{"task_id": r["task_id"], "completion": r["canonical_solution"]}
            for r in splits["humaneval_infill_span_light"]]
    samples = write_jsonl(tmp_path / "light.jsonl", rows)
    rc, out, err = run_cli(capsys, "--tasks", "humaneval_infill_span_light", "--samples", samples,
                           "--data-dir", shared_data, "--out", tmp_path / "o")
    assert rc == 0, err
    assert ("| Code | HumanEval-infilling random span light | pass@1 | 100.00 ± 0.00 % (164/164; n=1, "
            "from light.jsonl) |") in out
    assert "| exact match (middle) | 100.00 ± 0.00 % (164/164; n=1, from light.jsonl) |" in out
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    sample = report["tasks"]["humaneval_infill_span_light"]["samples"][0]
    problem = splits["humaneval_infill_span_light"][0]
    assert sample["code"] == problem["prompt"] + problem["canonical_solution"] + problem["suffix"]
    assert sample["status"] == "passed" and sample["exact_match"] is True


@pytest.mark.parametrize("task", sorted(STRIDES))
def test_a_fixed_sample_of_each_split_passes_with_its_canonical_middles(capsys, tmp_path, splits, shared_data, task):
    rows = splits[task]
    chosen = rows[::STRIDES[task]]
    if task == "humaneval_infill_span":  # and every empty or whitespace-only middle
        chosen += [r for r in rows if not r["canonical_solution"].strip() and r not in chosen]
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": r["task_id"], "completion": r["canonical_solution"]}
                                                 for r in chosen])
    rc, _, err = run_cli(capsys, "--tasks", task, "--samples", samples, "--data-dir", shared_data,
                         "--out", tmp_path / "o")
    assert rc == 0, err
    report = json.loads((tmp_path / "o" / "results.json").read_text())["tasks"][task]
    failed = [(s["task_id"], s["status"], s["detail"]) for s in report["samples"] if s["status"] != "passed"]
    assert not failed
    n = len(chosen)
    assert report["metrics"]["pass@1"]["count"] == f"{n}/{n}" == report["metrics"]["exact_match"]["count"]


def test_empty_middles_are_tasks_an_empty_completion_passes(splits):
    """The 14 empty canonical middles count like every task: an empty completion passes them and
    matches them exactly; where the middle is whitespace it does not match (whitespace is compared)."""
    from smallcoder.eval.infill import score_infill

    rows = splits["humaneval_infill_span"]
    empty = [r for r in rows if r["canonical_solution"] == ""]
    blank = [r for r in rows if r["canonical_solution"] and not r["canonical_solution"].strip()][:6]
    other = rows[:4]
    chosen = empty + blank + other
    result = score_infill("humaneval_infill_span", rows, [{"task_id": r["task_id"], "completion": ""} for r in chosen],
                          progress=False)
    by_id = {s["task_id"]: s for s in result.samples}
    assert all(by_id[r["task_id"]]["status"] == "passed" for r in empty)
    assert [by_id[r["task_id"]]["exact_match"] for r in chosen] == [True] * 14 + [False] * 10
    assert result.metrics["exact_match"].count == f"14/{len(chosen)}"
    assert result.metrics["pass@1"].total == len(chosen)  # every task in the denominator
    assert not any(by_id[r["task_id"]]["status"] == "passed" for r in other)


# ---------------------------------------------------------------- stop rules, exact match


def test_single_line_middle_keeps_the_newline_it_stopped_at(splits):
    """Without the newline the filled line runs into the suffix's first line, and even the canonical
    line fails (lm-eval's rule drops the newline); with it, it passes. Other splits stop at EOS only."""
    from smallcoder.eval.infill import middle, score_infill, stops

    assert stops("humaneval_infill_single") == ("\n",)
    assert stops("humaneval_infill_multi") == stops("humaneval_infill_span") == ()
    line = Completion(text="    return x", token_ids=[1], finish_reason="stop", prompt_tokens=3, stop_reason="\n")
    at_eos = Completion(text="    return x", token_ids=[1], finish_reason="stop", prompt_tokens=3, stop_reason=0)
    assert middle("humaneval_infill_single", line) == "    return x\n"
    assert middle("humaneval_infill_single", at_eos) == "    return x"
    assert middle("humaneval_infill_multi", line) == "    return x"  # a stop string not asked for

    # lines followed by an indented line (814 of the 1,033 suffixes start so) and not opening a block
    rows = [r for r in splits["humaneval_infill_single"][:40]
            if r["suffix"].startswith(" ") and not r["canonical_solution"].endswith(":\n")][:6]
    dropped = score_infill("humaneval_infill_single", rows, [
        {"task_id": r["task_id"], "completion": r["canonical_solution"].rstrip("\n")} for r in rows], progress=False)
    kept = score_infill("humaneval_infill_single", rows, [
        {"task_id": r["task_id"], "completion": middle("humaneval_infill_single", Completion(
            r["canonical_solution"].rstrip("\n"), [1], "stop", 3, "\n"))} for r in rows], progress=False)
    assert dropped.metrics["pass@1"].count == "0/6" and kept.metrics["pass@1"].count == "6/6"


def test_exact_match_compares_whitespace(splits):
    from smallcoder.eval.infill import score_infill

    r = splits["humaneval_infill_multi"][0]
    samples = [{"task_id": r["task_id"], "completion": r["canonical_solution"]},
               {"task_id": r["task_id"], "completion": r["canonical_solution"] + "\n"}]  # runs the same
    result = score_infill("humaneval_infill_multi", [r], samples, progress=False)
    assert [s["status"] for s in result.samples] == ["passed", "passed"]
    assert [s["exact_match"] for s in result.samples] == [True, False]
    assert result.metrics["exact_match"].value == 0.5 and result.metrics["pass@1"].value == 1.0


# ---------------------------------------------------------------- the model-driven path


class OracleEngine:
    """Stands in for the Engine: answers each FIM prompt with the task's canonical middle, as a
    model would (the single-line one ending at its newline stop, the others at EOS)."""

    def __init__(self, tokenizer, answers: dict[str, str], context: int = 100_000):
        self.tokenizer, self.answers, self.context_length, self.max_batch = tokenizer, answers, context, 8
        self.params = []

    def generate(self, prompts, params, on_complete=None):
        self.params.append(params)
        out = []
        for i, p in enumerate(prompts):
            text = self.answers[p]
            if "\n" in params.stop and "\n" in text:
                out.append(Completion(text[:text.index("\n")], [1], "stop", 3, "\n"))
            else:
                out.append(Completion(text, [1], "stop", 3, self.tokenizer.eos_id))
            if on_complete:
                on_complete(i)
        return out


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_model_path_with_an_oracle_scores_every_middle(splits, starcoder_dir, order):
    from smallcoder import Tokenizer
    from smallcoder.eval.infill import run_infill

    tok = Tokenizer.load(starcoder_dir)
    for task in ("humaneval_infill_single", "humaneval_infill_span"):
        rows = splits[task][:10]
        answers = {fim_prompt(r["prompt"], r["suffix"], order=order): r["canonical_solution"] for r in rows}
        engine = OracleEngine(tok, answers)
        result = run_infill(engine, task, rows, order=order, progress=False, model="oracle")
        assert result.metrics["pass@1"].count == "10/10" == result.metrics["exact_match"].count
        assert engine.params[0].temperature == 0 and tuple(engine.params[0].stop) == (("\n",) if "single" in task
                                                                                      else ())
        assert result.settings["fim_order"] == order and result.settings["cut_prompts"] == 0
        assert result.samples[0]["prompt"] == fim_prompt(rows[0]["prompt"], rows[0]["suffix"], order=order)


@pytest.fixture(scope="module")
def fim_checkpoint(tmp_path_factory) -> Path:
    """A micro model whose tokenizer has the FIM sentinels, with a 128-token context."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from smallcoder import ModelConfig, Tokenizer, new_model, save

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20,
                                trainer)
    folder = tmp_path_factory.mktemp("fim_tok")
    backend.save(str(folder / "tokenizer.json"))
    tok = Tokenizer.load(folder)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("fim_ckpt") / "micro"
    save(new_model(config, seed=1), tok, out)
    return out


def test_eval_end_to_end_with_a_model_cuts_prompts_to_the_context(capsys, tmp_path, fim_checkpoint, shared_data):
    """Every infilling prompt is longer than this model's 128 tokens: each is cut to 120 (128 - 8 new
    tokens), keeping the end of the prefix and the start of the suffix, in both orders."""
    from smallcoder import Tokenizer

    tok = Tokenizer.load(fim_checkpoint)
    for order in ("psm", "spm"):
        out = tmp_path / order
        rc, stdout, err = run_cli(capsys, "--model", fim_checkpoint, "--tasks",
                                  "humaneval_infill_single,humaneval_infill_span_light", "--limit", 3,
                                  "--max-new-tokens", 8, "--fim-order", order, "--data-dir", shared_data,
                                  "--out", out)
        assert rc == 0, err
        assert f"| Code | HumanEval-infilling single-line | pass@1 | 0.00 ± 0.00 % (0/3; {order.upper()}, n=1, T=0) |" \
            in stdout
        assert "3 prompt(s) did not fit the 128-token context and were cut to 120 tokens" in stdout
        report = json.loads((out / "results.json").read_text())
        rows = {r["task_id"]: r for r in load_task_data("humaneval_infill_single", shared_data)}
        for s in report["tasks"]["humaneval_infill_single"]["samples"]:
            p = rows[s["task_id"]]
            assert len(tok.encode(s["prompt"])) <= 120
            if order == "psm":
                assert s["prompt"].startswith(FIM_PREFIX) and s["prompt"].endswith(FIM_MIDDLE)
                head, tail = s["prompt"][len(FIM_PREFIX):-len(FIM_MIDDLE)].split(FIM_SUFFIX)
            else:
                assert s["prompt"].startswith(FIM_PREFIX + FIM_SUFFIX)
                tail, head = s["prompt"][len(FIM_PREFIX + FIM_SUFFIX):].split(FIM_MIDDLE)
            assert p["prompt"].endswith(head) and p["suffix"].startswith(tail) and head and tail
            assert s["code"] == p["prompt"] + s["completion"] + p["suffix"]  # the program is never cut
            assert "\n" not in s["completion"][:-1]
        settings = report["tasks"]["humaneval_infill_single"]["settings"]
        assert settings["cut_prompts"] == 3 and settings["stop"] == ["<|endoftext|>", "\n"]


# ---------------------------------------------------------------- fit_fim


def test_fit_fim_keeps_the_text_nearest_the_hole(starcoder_dir):
    from smallcoder import Tokenizer

    tok = Tokenizer.load(starcoder_dir)
    prefix = "".join(f"x{i} = 'é{i}😀'\n" for i in range(60))  # multi-byte characters tokens may split
    suffix = "".join(f"print('ü{i}', x{i})\n" for i in range(60))
    assert fit_fim("a = 1\n", "b\n", tok, 10_000) == ("a = 1\n", "b\n")
    for order in ("psm", "spm"):
        for budget in (40, 101, 250):
            head, tail = fit_fim(prefix, suffix, tok, budget, order=order)
            assert prefix.endswith(head) and suffix.startswith(tail)
            used = len(tok.encode(fim_prompt(head, tail, order=order)))
            assert budget - 8 <= used <= budget  # cut to the budget, not far below it
            room = budget - 3
            assert abs(len(tok.encode(head)) - (room - room // 4)) <= 4  # both long: the suffix a quarter
        short, tail = fit_fim("def f():\n", suffix, tok, 60, order=order)  # a short side is kept whole
        assert short == "def f():\n" and len(tok.encode(fim_prompt(short, tail, order=order))) >= 55
    with pytest.raises(SmallCoderError, match="needs at least"):
        fit_fim(prefix, suffix, tok, 2)


def test_cut_prompts_leave_the_engine_nothing_to_cut(splits, fim_checkpoint):
    """A cut prompt is shorter than the context even with no room asked for the middle (the engine
    would otherwise drop its first tokens, the <fim_prefix> among them)."""
    from smallcoder import Tokenizer
    from smallcoder.eval.infill import cut_target, infill_prompts

    assert (cut_target(128, 0), cut_target(128, 8), cut_target(128, 512)) == (127, 120, 64)
    tok = Tokenizer.load(fim_checkpoint)
    rows = splits["humaneval_infill_multi"][:5]
    for new in (0, 8, 512):
        prompts, cut = infill_prompts(rows, tok, 128, new, order="spm")
        assert cut == 5 and all(len(tok.encode(p)) <= cut_target(128, new) for p in prompts)
        assert all(p.startswith(FIM_PREFIX + FIM_SUFFIX) for p in prompts)
    with pytest.raises(SmallCoderError, match="--fim-order must be one of psm, spm"):
        infill_prompts(rows, tok, 128, 8, order="pms")


# ---------------------------------------------------------------- bad input


def test_a_tokenizer_without_fim_tokens_is_refused_before_anything_runs(capsys, micro_checkpoint, shared_data):
    rc, out, err = run_cli(capsys, "--model", micro_checkpoint, "--tasks", "humaneval,humaneval_infill_single",
                           "--limit", 1, "--max-new-tokens", 2, "--data-dir", shared_data)
    assert rc == 2 and "humaneval: done" not in err and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith(f"smallcoder: error: --model {micro_checkpoint}: its tokenizer has no "
                           "<fim_suffix>, <fim_middle> token")


def test_unknown_task_ids_are_one_line_naming_them(capsys, tmp_path, shared_data):
    samples = write_jsonl(tmp_path / "s.jsonl", [
        {"task_id": "SingleLineInfilling/HumanEval/0/L0", "completion": ""},
        {"task_id": "SingleLineInfilling/HumanEval/0/L99", "completion": ""},
        {"task_id": "RandomSpanInfilling/HumanEval/0/1", "completion": ""}])
    rc, _, err = run_cli(capsys, "--tasks", "humaneval_infill_single", "--samples", samples, "--data-dir", shared_data)
    assert rc == 2
    [line] = err.strip().splitlines()
    assert ("unknown humaneval_infill_single task id(s): RandomSpanInfilling/HumanEval/0/1, "
            "SingleLineInfilling/HumanEval/0/L99 (expected e.g. 'SingleLineInfilling/HumanEval/0/L0'); "
            "ids of another split: use --tasks humaneval_infill_span") in line
