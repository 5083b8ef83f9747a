"""Answer metrics: normalisation, token F1, option letters, per-task and sample-weighted overall scores."""

import pytest

from finetune.evaluation.metrics import choice_letter, format_metrics, is_choice_reference, normalise, score, token_f1


def _items(task, pairs):
    return [{"task": task, "reference": ref, "prediction": pred} for ref, pred in pairs]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Red.", "red"),
        ("Red", "red"),
        ("  two  dogs\n", "two dogs"),
        ("A\tbig \n cat!", "a big cat"),
        ("...Yes!!", "yes"),
        (" . red . ", "red"),
        ("don't", "don't"),
        ("", ""),
        ("?!", ""),
    ],
)
def test_normalise(text, expected):
    assert normalise(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the red ball", "a red cube", 0.5),  # [red, ball] vs [red, cube]
        ("red", "red", 1.0),
        ("The Red Ball.", "red ball", 1.0),  # case, punctuation and articles do not count
        ("red ball", "blue cube", 0.0),
        ("red", "red ball", 2 / 3),  # P=1 R=1/2
        ("red red ball", "red ball", 0.8),  # multiset: overlap 2, P=2/3 R=1
        ("red red", "red", 2 / 3),  # overlap 1, P=1/2 R=1
        ("a big red dog", "the small red dog", 2 / 3),  # [big, red, dog] vs [small, red, dog]: P=R=2/3
        ("red,green", "red green", 0.0),  # punctuation is deleted, not split on: "redgreen"
        ("red, green", "green red", 1.0),
        ("", "", 1.0),
        ("the", "an", 1.0),  # both empty after removing articles
        ("", "red", 0.0),
        ("red", "the", 0.0),
    ],
)
def test_token_f1(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("B: cat", "B"),
        ("(B) cat", "B"),
        ("Answer: B", "B"),
        ("The answer is (C).", "C"),
        (" J ", "J"),
        ("A", "A"),
        ("A.", "A"),
        ("A) dog", "A"),
        ("(a) dog", "A"),
        ("Blue", None),
        ("A dog runs", None),
        ("A dog", None),
        ("I think so", None),
        ("K", None),  # only A-J
        ("(K)", None),
        ("", None),
        ("cat", None),
    ],
)
def test_choice_letter(text, expected):
    assert choice_letter(text) == expected


@pytest.mark.parametrize("text", ["B", "(B)", "B.", "B)", " B ", "\n(C)\n", "J"])
def test_choice_reference_forms(text):
    assert is_choice_reference(text)


@pytest.mark.parametrize("text", ["Blue", "A dog", "B: cat", "(B) cat", "K", "", "BB"])
def test_not_a_choice_reference(text):
    assert not is_choice_reference(text)


def test_letter_task_exact_match_and_choice_accuracy_differ():
    metrics = score(_items("mc", [("B", "(B) a cat"), ("(A)", "A"), ("C.", "D"), ("D)", "Answer: D")]))
    task = metrics["tasks"]["mc"]
    # exact: "(B) a cat" != "b"; "a" == "a" ("(A)" normalises to "a"); "d" != "c"; "answer: d" != "d)" -> "d"
    assert task["exact_match"] == pytest.approx(0.25)
    assert task["choice_accuracy"] == pytest.approx(0.75)  # B, A, D right; C vs D wrong
    assert task["chance"] == pytest.approx(1 / 4)
    assert metrics["choice_accuracy"] == pytest.approx(0.75)


def test_free_form_task_has_no_choice_accuracy():
    metrics = score(_items("colour", [("red", "Red."), ("blue", "green"), ("B", "B")]))
    task = metrics["tasks"]["colour"]
    assert task["choice_accuracy"] is None and metrics["choice_accuracy"] is None
    assert task["exact_match"] == pytest.approx(2 / 3)
    assert task["token_f1"] == pytest.approx(2 / 3)


def test_overall_is_sample_weighted_over_tasks():
    big = _items("count", [("two", "two"), ("three", "four"), ("two", "one"), ("one", "one")])  # exact 0.5, chance 1/3
    small = _items("mc", [("A", "(A) dog"), ("B", "B")])  # exact 0.5, choice 1.0, chance 1/2
    free = _items("colour", [("red", "red"), ("red", "Red"), ("blue", "the blue one")])  # exact 2/3, chance 1/2
    metrics = score(big + small + free)
    assert list(metrics["tasks"]) == ["colour", "count", "mc"]
    assert metrics["n"] == 9 and [t["n"] for t in metrics["tasks"].values()] == [3, 4, 2]
    assert metrics["tasks"]["count"]["chance"] == pytest.approx(1 / 3)
    assert metrics["exact_match"] == pytest.approx((3 * 2 / 3 + 4 * 0.5 + 2 * 0.5) / 9)
    assert metrics["chance"] == pytest.approx((3 * 0.5 + 4 / 3 + 2 * 0.5) / 9)
    f1_colour = (1 + 1 + 2 / 3) / 3  # "blue one" vs "blue": P=1/2 R=1
    f1_mc = (0 + 1) / 2  # "(A) dog" -> [dog] vs "A" -> [] (an article): one side empty -> 0
    assert metrics["token_f1"] == pytest.approx((3 * f1_colour + 4 * 0.5 + 2 * f1_mc) / 9)
    # only "mc" has a choice accuracy, so the overall one is that task's, not diluted by the others
    assert metrics["choice_accuracy"] == pytest.approx(1.0)


def test_overall_choice_accuracy_weights_only_choice_tasks():
    one = _items("mc1", [("A", "A"), ("B", "C"), ("C", "C"), ("D", "A")])  # 0.5
    two = _items("mc2", [("A", "A"), ("B", "B")])  # 1.0
    metrics = score(one + two + _items("free", [("red", "blue")]))
    assert metrics["choice_accuracy"] == pytest.approx((4 * 0.5 + 2 * 1.0) / 6)


def test_chance_counts_distinct_normalised_references():
    metrics = score(_items("t", [("Yes", "x"), ("yes.", "x"), (" YES ", "x"), ("no", "x"), ("No!", "x")]))
    assert metrics["tasks"]["t"]["chance"] == pytest.approx(0.5)


def test_accuracy_alias_equals_exact_match():
    metrics = score(_items("a", [("red", "red"), ("blue", "red")]) + _items("b", [("x", "y")]))
    assert metrics["accuracy"] == metrics["exact_match"] == pytest.approx(1 / 3)
    for task in metrics["tasks"].values():
        assert task["accuracy"] == task["exact_match"]
    assert metrics["tasks"]["a"]["accuracy"] == pytest.approx(0.5)


def test_empty_items_raise():
    with pytest.raises(ValueError, match="no predictions to score"):
        score([])


def test_format_metrics_table():
    metrics = score(_items("mc", [("B", "(B) cat"), ("A", "A")]) + _items("colour_questions", [("red", "Red")]))
    lines = format_metrics(metrics).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["task", "n", "exact", "f1", "choice", "chance"]
    assert lines[1].split() == ["colour_questions", "1", "1.000", "1.000", "-", "1.000"]
    assert lines[2].split()[:2] == ["mc", "2"] and lines[2].split()[2] == "0.500" and lines[2].split()[4] == "1.000"
    assert lines[3].split()[:2] == ["overall", "3"]
    assert len({len(line) for line in lines}) == 1  # fixed width
