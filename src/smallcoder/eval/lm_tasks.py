"""Log-likelihood benchmarks: ARC Easy/Challenge, HellaSwag (acc, acc_norm) and Wikitext-2 perplexity.

Each follows lm-evaluation-harness, so the numbers compare with published ones:

- ARC (lm_eval/tasks/arc/arc_easy.yaml): context ``Question: {question}\\nAnswer:``; each choice is
  scored as the continuation ``" " + choice`` (the default target delimiter).
- HellaSwag (lm_eval/tasks/hellaswag/utils.py): context = the preprocessed
  ``activity_label: ctx``, continuations ``" " + ending``. The `preprocess` step (strip, `` [title]``
  to ``". "``, drop other ``[...]`` markup, collapse double spaces) is done by
  `smallcoder.eval.data` for both the local text form and the Hub rows, so items arrive clean
  and are used as they are (applying it twice is not a no-op on runs of three spaces).
- acc = argmax of the summed log-probabilities; acc_norm = argmax of that sum divided by
  ``len(choice)`` in characters. lm-eval's `process_results` takes the length of the choice
  string *without* the leading delimiter space (``completion_len = [len(i) for i in choices]``,
  where choices come from `doc_to_choice`), and so do we.
- Wikitext-2 (lm_eval/tasks/wikitext): the raw test text is split into articles at ``= Title =``
  headings (the `wikitext_document_level` loader), each article is detokenized with
  `wikitext_detokenizer` and scored with rolling log-likelihood (`Engine.loglikelihood_rolling`:
  disjoint windows of the context length, the first token predicted from EOS/BOS). Words and
  bytes are counted on the original, not the detokenized, article.

Standard errors are sqrt(p(1-p)/(n-1)) for accuracies, as lm-eval and our pass@k report them. Perplexities are corpus-level ratios and carry no count.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from ..checks import known
from ..errors import SmallCoderError
from .passk import proportion
from .results import Score, TaskResult

if TYPE_CHECKING:
    from ..inference import Engine

MULTIPLE_CHOICE_TASKS = {"arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation"}
ARC_TEMPLATE = "Question: {question}\nAnswer:"


# ---------------------------------------------------------------- multiple choice

def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SmallCoderError(f"limit must be a positive integer or None, got {limit!r}")


def multiple_choice_item(task: str, item: dict[str, Any], index: int) -> tuple[str, list[str], int]:
    """(context, choices, gold index) of one ARC or HellaSwag record from `eval.data`."""
    where = f"{task} item {index}" + (f" (id {item['id']!r})" if isinstance(item, dict) and "id" in item else "")
    if not isinstance(item, dict):
        raise SmallCoderError(f"{where}: expected a dict record, got {type(item).__name__}")
    if task == "hellaswag":
        fields = ("ctx", "endings", "label")
    else:
        fields = ("question", "choices", "answer_index")
    missing = [f for f in fields if f not in item]
    if missing:
        raise SmallCoderError(f"{where}: missing field(s) {', '.join(missing)} (has {', '.join(map(str, item))})")
    text, choices, gold = (item[f] for f in fields)
    if not isinstance(text, str) or not text.strip():
        raise SmallCoderError(f"{where}: field {fields[0]!r} must be a non-empty string, got {text!r:.80}")
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise SmallCoderError(f"{where}: field {fields[1]!r} must be a list of non-empty strings, "
                              f"got {choices!r:.120}")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise SmallCoderError(f"{where}: field {fields[2]!r} must be an index into the "
                              f"{len(choices)} choices, got {gold!r}")
    context = text if task == "hellaswag" else ARC_TEMPLATE.format(question=text)
    return context, list(choices), gold


def _argmax(values: list[float]) -> int:
    """Index of the largest value, the first on ties (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def run_multiple_choice(engine: Engine, task: str, items: list[dict], limit: int | None = None,
                        batch_size: int = 16) -> TaskResult:
    """Score ARC Easy/Challenge or HellaSwag: acc and acc_norm over the first `limit` items."""
    known(task, "multiple-choice task", MULTIPLE_CHOICE_TASKS)
    _check_limit(limit)
    items = list(items)[:limit] if limit is not None else list(items)
    if not items:
        raise SmallCoderError(f"{task}: no items to score")
    parsed = [multiple_choice_item(task, item, i) for i, item in enumerate(items)]
    requests = [(context, " " + choice) for context, choices, _ in parsed for choice in choices]
    scores = iter(engine.loglikelihood(requests, batch_size=batch_size, desc=task))

    samples: list[dict[str, Any]] = []
    n_acc = n_norm = 0
    for i, (item, (context, choices, gold)) in enumerate(zip(items, parsed)):
        got = [next(scores) for _ in choices]
        lls = [ll for ll, _ in got]
        pred = _argmax(lls)
        pred_norm = _argmax([ll / len(choice) for ll, choice in zip(lls, choices)])
        n_acc += pred == gold
        n_norm += pred_norm == gold
        samples.append({"index": i, "id": item.get("id", i), "context": context, "choices": choices,
                        "gold": gold, "loglikelihoods": lls, "greedy": [g for _, g in got],
                        "pred": pred, "pred_norm": pred_norm, "acc": int(pred == gold),
                        "acc_norm": int(pred_norm == gold)})
    n = len(items)
    settings = {"split": MULTIPLE_CHOICE_TASKS[task], "shots": 0, "items": n, "limit": limit,
                "requests": len(requests), "batch_size": batch_size,
                "context": "{ctx}" if task == "hellaswag" else ARC_TEMPLATE,
                "continuation": '" " + choice', "acc_norm": "loglikelihood / len(choice) in characters",
                "context_length": engine.context_length}
    return TaskResult(task, {"acc": proportion(n_acc, n), "acc_norm": proportion(n_norm, n)},
                      settings=settings, samples=samples,
                      notes=["stderr = sqrt(p(1-p)/(n-1)) as lm-eval", "protocol: lm-evaluation-harness multiple_choice, 0-shot"])


# ---------------------------------------------------------------- Wikitext-2

def split_wikitext_documents(text: str) -> list[str]:
    """The articles of a raw WikiText file, each starting with its `` = Title = `` line.

    lm-eval's `wikitext_document_level` loader: a line is a title when, after ``= = =`` and
    ``= =`` are squeezed to ``===``/``==`` and the ends stripped, it starts with ``"= "`` and
    ends with ``" ="`` (section headings ``= = X = =`` become ``== X ==`` and do not split).
    Lines are rejoined with ``"\\n"``, so an article keeps its leading spaces and blank lines.
    Blank-only pieces (the line before the first title) are dropped.
    """
    pages: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        squeezed = line.replace("= = =", "===").replace("= =", "==").strip()
        if squeezed.startswith("= ") and squeezed.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    page = "\n".join(lines)
    if page.strip():
        pages.append(page)
    return pages


def wikitext_detokenizer(string: str) -> str:
    """Undo WikiText's tokenization (`` @-@ ``, `` , ``, spaced brackets and quotes ...).

    Rule for rule the `wikitext_detokenizer` of lm-evaluation-harness,
    lm_eval/tasks/wikitext/preprocess_wikitext.py (EleutherAI/lm-evaluation-harness, MIT),
    which Megatron-LM's wikitext evaluation also uses; the odd ``/' [0-9]/`` pattern is theirs.
    """
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def count_words(page: str) -> int:
    """Words as lm-eval counts them for word_perplexity: ``len(re.split(r"\\s+", page))``.

    Leading/trailing whitespace yields empty pieces that count too; that is the protocol.
    """
    return len(re.split(r"\s+", page))


def perplexity_metrics(loglikelihood: float, words: int, n_bytes: int) -> dict[str, Score]:
    """word_perplexity, byte_perplexity and bits_per_byte from corpus totals (lm-eval's
    `weighted_perplexity` and `bits_per_byte` aggregations)."""
    if words < 1 or n_bytes < 1:
        raise SmallCoderError(f"perplexity needs at least one word and one byte, got {words} words, "
                              f"{n_bytes} bytes")
    return {"word_perplexity": Score(math.exp(-loglikelihood / words)),
            "byte_perplexity": Score(math.exp(-loglikelihood / n_bytes)),
            "bits_per_byte": Score(-loglikelihood / n_bytes / math.log(2))}


def _title(page: str) -> str:
    for line in page.split("\n"):
        if line.strip():
            return line.strip().strip("=").strip()
    return ""


def run_wikitext2(engine: Engine, text: str, limit: int | None = None, batch_size: int = 8) -> TaskResult:
    """Wikitext-2 perplexities over the first `limit` articles of the raw test text."""
    _check_limit(limit)
    if not isinstance(text, str):
        raise SmallCoderError(f"wikitext2: expected the raw test text as a str, got {type(text).__name__}")
    pages = split_wikitext_documents(text)
    if not pages:
        raise SmallCoderError("wikitext2: the text holds no article (no non-blank lines)")
    total_docs = len(pages)
    pages = pages[:limit] if limit is not None else pages
    token_ids = [engine.tokenizer.encode(wikitext_detokenizer(p)) for p in pages]
    lls = engine.loglikelihood_rolling(token_ids, batch_size=batch_size, desc="wikitext2")
    words = [count_words(p) for p in pages]
    n_bytes = [len(p.encode("utf-8")) for p in pages]
    ctx = engine.context_length
    samples = [{"index": i, "title": _title(p), "loglikelihood": ll, "tokens": len(ids), "words": w,
                "bytes": b, "windows": max(0, -(-len(ids) // ctx))}
               for i, (p, ids, ll, w, b) in enumerate(zip(pages, token_ids, lls, words, n_bytes))]
    settings = {"split": "test", "documents": len(pages), "documents_total": total_docs, "limit": limit,
                "tokens": sum(len(t) for t in token_ids), "words": sum(words), "bytes": sum(n_bytes),
                "loglikelihood": sum(lls), "context_length": ctx, "windows": "disjoint",
                "first_token_prefix": "eos", "batch_size": batch_size}
    return TaskResult("wikitext2", perplexity_metrics(sum(lls), sum(words), sum(n_bytes)),
                      settings=settings, samples=samples,
                      notes=["words and bytes counted on the original (not detokenized) articles",
                             "protocol: lm-evaluation-harness wikitext (document level, rolling loglikelihood)"])
