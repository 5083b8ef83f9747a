"""Answer metrics for visual question answering, per task and overall (sample-weighted over tasks).

exact_match: normalised prediction == normalised reference (lower case, no surrounding punctuation/whitespace).
  `accuracy` is kept as an alias of exact_match for older reports.
token_f1: SQuAD-style F1 of the multiset token overlap, after removing punctuation and the articles a/an/the.
  Partial credit for free-form answers ("a red ball" vs "the red cube" -> 0.5).
choice_accuracy: the option letter stated by the prediction ("(B) cat", "Answer: B") == the reference's letter.
  Only for tasks whose every reference is a bare option letter ("B", "(B)", "B.", "B)"); None otherwise.
chance: 1 / (distinct normalised references in the task), the accuracy of guessing uniformly among the answers.
  Compare exact_match against it: a model at chance has learnt nothing about the task.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter

_STRIP = string.punctuation + " "
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES = frozenset({"a", "an", "the"})
_CHOICE_PREFIX = re.compile(  # "Answer:", "The answer is", "The correct option:"
    r"(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:answer|option|choice)\b(?:\s+is)?\s*:?\s*", re.IGNORECASE
)
_CHOICE_REFERENCE = re.compile(r"\s*(?:\([A-J]\)|[A-J][.)]?)\s*")


def normalise(text: str) -> str:
    """Lower case, internal whitespace collapsed, surrounding whitespace and punctuation stripped."""
    return " ".join(text.lower().split()).strip(_STRIP)


def _tokens(text: str) -> list[str]:
    return [t for t in normalise(text).translate(_PUNCT_TABLE).split() if t not in _ARTICLES]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 (no punctuation, no articles); 1.0 when both have no tokens, 0.0 when one has none."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _letter_patterns(last: str) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    both = f"A-{last}a-{last.lower()}"
    return (
        re.compile(rf"\(([{both}])\)"),  # "(B)", "(B) cat", "(b)."
        re.compile(rf"([{both}])[.:)]?"),  # the whole text: "B", "b", "B.", "B)", "B:"
        re.compile(rf"([A-{last}])[.:)]\s"),  # "B. cat", "B) cat", "B: cat" (upper case only)
    )


def choice_letter(text: str, last: str = "J") -> str | None:
    """The option letter (A to `last`, upper case) a text states, e.g. "B", "(B) cat", "B: cat", "The answer is (C).";
    None when it states none. A leading capital word is not an option: "A dog" -> None, "A) dog" -> "A".
    Evaluation reads A-J; the `choice` reward (finetune/evaluation/rewards.py) reads A-Z."""
    rest = text.strip()
    prefix = _CHOICE_PREFIX.match(rest)
    if prefix:
        rest = rest[prefix.end() :]
    paren, bare, delimited = _letter_patterns(last)
    match = paren.match(rest) or bare.fullmatch(rest) or delimited.match(rest)
    return match.group(1).upper() if match else None


def is_choice_reference(text: str) -> bool:
    """True when the reference is just an upper-case option letter: "B", "(B)", "B." or "B)"."""
    return _CHOICE_REFERENCE.fullmatch(text) is not None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _score_task(items: list[dict]) -> dict:
    refs, preds = [it["reference"] for it in items], [it["prediction"] for it in items]
    exact = _mean([float(normalise(p) == normalise(r)) for p, r in zip(preds, refs)])
    choice = None
    if all(is_choice_reference(r) for r in refs):
        choice = _mean([float(choice_letter(p) == choice_letter(r)) for p, r in zip(preds, refs)])
    return {
        "n": len(items),
        "exact_match": exact,
        "accuracy": exact,
        "token_f1": _mean([token_f1(p, r) for p, r in zip(preds, refs)]),
        "choice_accuracy": choice,
        "chance": 1 / len({normalise(r) for r in refs}),
    }


def _weighted(tasks: list[dict], key: str) -> float | None:
    scored = [t for t in tasks if t[key] is not None]
    if not scored:
        return None
    return sum(t["n"] * t[key] for t in scored) / sum(t["n"] for t in scored)


def score(items: list[dict]) -> dict:
    """Metrics per task (sorted by name) and overall, from dicts with `task`, `reference` and `prediction`."""
    if not items:
        raise ValueError("no predictions to score")
    by_task: dict[str, list[dict]] = {}
    for item in items:
        by_task.setdefault(item["task"], []).append(item)
    tasks = {name: _score_task(by_task[name]) for name in sorted(by_task)}
    values = list(tasks.values())
    exact = _weighted(values, "exact_match")
    return {
        "n": len(items),
        "exact_match": exact,
        "accuracy": exact,
        "token_f1": _weighted(values, "token_f1"),
        "choice_accuracy": _weighted(values, "choice_accuracy"),
        "chance": _weighted(values, "chance"),
        "tasks": tasks,
    }


def format_metrics(metrics: dict) -> str:
    """A fixed-width table: one line per task, then "overall"; "-" where a task has no choice accuracy."""
    rows = [*metrics.get("tasks", {}).items(), ("overall", metrics)]
    width = max(len("task"), *(len(name) for name, _ in rows))

    def cell(value: float | None) -> str:
        return f"{'-' if value is None else f'{value:.3f}':>7}"

    lines = [f"{'task':<{width}} {'n':>6} {'exact':>7} {'f1':>7} {'choice':>7} {'chance':>7}"]
    for name, m in rows:
        values = (m.get("exact_match", m.get("accuracy")), m.get("token_f1"), m.get("choice_accuracy"), m["chance"])
        lines.append(f"{name:<{width}} {m['n']:>6} " + " ".join(cell(v) for v in values))
    return "\n".join(lines)
