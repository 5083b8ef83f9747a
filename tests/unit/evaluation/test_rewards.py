"""Rewards: each shipped one on right, wrong, unreadable (NoScore) and edge answers; box IoU in both families' frames
with a solution converted from original pixels; the table's weighted sums and no-score counts; one-line errors for a
reward that raises or returns NaN; users' rewards by import path and each import error."""

import math
import pickle

import pytest

from finetune.base.errors import ConfigError, DataError
from finetune.base.families import FAMILIES
from finetune.data.vision import smart_resize
from finetune.evaluation.metrics import token_f1
from finetune.evaluation.rewards import (
    BOX_FRAMES,
    SHIPPED,
    NoScore,
    RewardTable,
    answer_text,
    box_iou,
    box_to_model_frame,
    build_rewards,
    choice,
    edit_distance,
    exact_match,
    f1,
    format_reward,
    iou,
    levenshtein,
    load_reward,
    number,
    temporal_iou,
)


def wrap(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>x</think><answer> B </answer>", "B"),
        ("<answer>first</answer> then <answer>second</answer>", "second"),  # the last complete one
        ("<think>because</think> 42", "42"),  # no tags: after the thinking
        ("  plain answer \n", "plain answer"),
        ("<think>x</think><answer>cut off", None),  # opened, never closed
        ("<think>still thinking", None),
    ],
)
def test_answer_text(completion, expected):
    assert answer_text(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("\n <think>\na\n</think>\n\n<answer> b </answer>\n", 1.0),  # whitespace around and between
        ("<think></think><answer></answer>", 1.0),
        ("<answer>b</answer>", 0.0),  # no thinking
        ("<think>a</think>", 0.0),  # no answer
        ("<think>a</think>b<answer>b</answer>", 0.0),  # text between the blocks
        ("<think>a</think><answer>b</answer> trailing", 0.0),
        ("<answer>b</answer><think>a</think>", 0.0),  # wrong order
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),  # a repeated tag
        ("<think>a<think>b</think><answer>c</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_format(completion, expected):
    assert format_reward(completion, None) == expected


def test_format_with_think_opened_by_the_prompt():
    assert format_reward("a</think><answer>b</answer>", None, opened_in_prompt=True) == 1.0
    assert format_reward("<think>a</think><answer>b</answer>", None, opened_in_prompt=True) == 0.0  # opened twice


@pytest.mark.parametrize(
    ("completion", "solution", "expected"),
    [
        (wrap("B"), "B", 1.0),
        (wrap("(B)"), "B", 1.0),
        (wrap("B."), "(B)", 1.0),
        (wrap("B) a cat"), "B", 1.0),
        (wrap("The answer is B"), "B. a cat", 1.0),
        ("Looking at the image, the answer is (B).", "B", 1.0),  # no tags, stated after other text
        ("so the final answer: C", "C", 1.0),
        (wrap("b"), "B", 1.0),
        (wrap("Z"), "Z", 1.0),  # A-Z, beyond evaluation's A-J
        (wrap("\\boxed{D}"), "D", 1.0),
        (wrap("C"), "B", 0.0),
        ("the answer is A.", "B", 0.0),
        (wrap("a cat"), "B", NoScore),
        (wrap("The answer is A dog"), "A", NoScore),  # a word, not an option
        (wrap(""), "B", NoScore),
        ("<think>B</think><answer>unclosed B", "B", NoScore),
    ],
)
def test_choice(completion, solution, expected):
    assert choice(completion, solution) is expected if expected is NoScore else choice(completion, solution) == expected


def test_choice_solution_without_a_letter_raises():
    with pytest.raises(ValueError, match="'a cat' is not an option letter"):
        choice(wrap("B"), "a cat")


@pytest.mark.parametrize(
    ("answer", "solution", "expected"),
    [
        ("42", "42", 1.0),
        ("42", 42, 1.0),
        ("There are 7 apples.", "7", 1.0),
        ("3 plus 4 is 7", 7, 1.0),  # the last number
        ("1,234,567", 1234567, 1.0),
        ("$1{,}234.50", "1234.5", 1.0),  # LaTeX and money noise
        ("3/4", 0.75, 1.0),
        ("-\\frac{3}{4}", "-0.75", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", "1/2", 1.0),
        ("x = 2 and \\boxed{5}, then 9", 5, 1.0),  # \boxed wins over the last number
        ("50%", 0.5, 1.0),  # a percentage as p/100 ...
        ("50%", "50", 1.0),  # ... or as written
        ("50\\%", "50%", 1.0),
        ("1.5e3", 1500, 1.0),
        ("2-5", -5, 0.0),  # a minus between two numbers is no sign: 5
        ("0.5", "1/2", 1.0),
        ("100.9", 100, 1.0),  # within the default 1e-2
        ("101.1", 100, 0.0),
        ("43", "42", 0.0),
        ("-42", "42", 0.0),
        ("0", 0, 1.0),
        ("no idea", "42", NoScore),
        ("1/0", "1", NoScore),
    ],
)
def test_number(answer, solution, expected):
    got = number(wrap(answer), solution)
    assert got is NoScore if expected is NoScore else got == expected


def test_number_tolerances():
    assert number(wrap("100.5"), 100, rel_tol=0) == 0.0  # exact
    assert number(wrap("100"), "100.0", rel_tol=0) == 1.0
    assert number(wrap("0.001"), 0, abs_tol=1e-2) == 1.0
    assert number(wrap("0.001"), 0) == 0.0  # relative tolerance of 0 is 0
    assert number(wrap("104"), 100, rel_tol=0.05) == 1.0


def test_number_unreadable_solution_raises():
    with pytest.raises(ValueError, match="states no number"):
        number(wrap("4"), "four")


def test_exact_match_and_f1_are_the_evaluation_metrics():
    assert exact_match(wrap(" The Cat."), "the cat") == 1.0
    assert exact_match(wrap("a cat"), "the cat") == 0.0
    assert exact_match(wrap("dog"), ["cat", "Dog"]) == 1.0  # any acceptable answer
    assert f1(wrap("the red ball"), "a red cube") == pytest.approx(0.5)  # [red, ball] vs [red, cube]
    assert f1(wrap("red ball"), ["blue", "red ball"]) == pytest.approx(1.0)
    # the same function evaluation reports, applied to the answer alone (the think block does not count)
    assert f1("<think>red red red</think><answer>red ball</answer>", "red") == pytest.approx(
        token_f1("red ball", "red")
    )
    assert exact_match("<answer>cut", "cut") is NoScore and f1("<think>x", "x") is NoScore


def test_edit_distance():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2
    assert edit_distance(wrap("kitten"), "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_distance(wrap("HELLO  world"), "HELLO world") == 1.0  # whitespace runs collapsed
    assert edit_distance(wrap("hello world"), "HELLO world") == pytest.approx(1 - 5 / 11)  # case counts in OCR
    assert edit_distance(wrap("hello world."), "HELLO world", normalise_text=True) == 1.0
    assert edit_distance(wrap(""), "") == 1.0
    assert edit_distance(wrap("abc"), "") == 0.0
    assert edit_distance(wrap("abcd"), ["zzzz", "abce"]) == pytest.approx(0.75)
    assert edit_distance("<answer>abc", "abc") is NoScore


# A 640 x 480 (width x height) photo under Qwen2.5-VL's budget: smart_resize(480, 640, 3136, 200704, 28) by hand:
# 480x640 rounds to 476x644 = 306,544 pixels > 200,704, so beta = sqrt(307,200 / 200,704) = 1.2372 and
# height = floor(480 / 1.2372 / 28) * 28 = 13 * 28 = 364, width = floor(640 / 1.2372 / 28) * 28 = 18 * 28 = 504.
IMAGE, RESIZED = (640, 480), (504, 364)
BOX = [64, 48, 320, 240]  # the solution, in the photo's pixels


def test_smart_resize_gives_the_hand_computed_size():
    height, width = smart_resize(480, 640, 3136, 200704, factor=28)  # (height, width): the rewards take (w, h)
    assert (width, height) == RESIZED


def test_box_to_the_model_frames():
    # Qwen2.5-VL: x * 504/640 = x * 0.7875, y * 364/480
    assert box_to_model_frame(BOX, "qwen2_5_vl", IMAGE, RESIZED) == pytest.approx((50.4, 36.4, 252.0, 182.0))
    # the others: 0-1000 of the width and height
    for family in ("qwen2_vl", "qwen3_vl", "qwen3_5"):
        assert box_to_model_frame(BOX, family, IMAGE) == pytest.approx((100.0, 100.0, 500.0, 500.0))
    with pytest.raises(ValueError, match="pass extras resized_size"):
        box_to_model_frame(BOX, "qwen2_5_vl", IMAGE)
    with pytest.raises(ValueError, match="not one of"):
        box_to_model_frame(BOX, "llava", IMAGE)
    with pytest.raises(ValueError, match=r"image_size=\(640, 0\)"):
        box_to_model_frame(BOX, "qwen2_vl", (640, 0))


def test_box_iou_in_qwen2_5_vl_resized_pixels():
    frame = dict(family="qwen2_5_vl", image_size=IMAGE, resized_size=RESIZED)
    # [50, 36, 252, 182] against [50.4, 36.4, 252, 182]: intersection 201.6 x 145.6, union the prediction's 202 x 146
    assert box_iou(wrap('{"bbox_2d": [50, 36, 252, 182]}'), BOX, **frame) == pytest.approx(201.6 * 145.6 / (202 * 146))
    # the photo's own pixels are not the frame Qwen2.5-VL answers in: [64, 48, 320, 240] overlaps by 188 x 134
    inter = 188 * 134
    expected = inter / (256 * 192 + 201.6 * 145.6 - inter)
    assert box_iou(wrap("[64, 48, 320, 240]"), BOX, **frame) == pytest.approx(expected)
    assert expected < 0.5


def test_box_iou_in_0_1000():
    assert box_iou(wrap("<|box_start|>(100,100),(500,500)<|box_end|>"), BOX, family="qwen2_vl", image_size=IMAGE) == 1.0
    # [100, 100, 500, 400] inside [100, 100, 500, 500]: 400 x 300 of 400 x 400
    got = box_iou(wrap('[{"bbox_2d": [100, 100, 500, 400], "label": "dog"}]'), BOX, family="qwen3_vl", image_size=IMAGE)
    assert got == pytest.approx(0.75)


def test_box_iou_solution_already_in_the_model_frame():
    assert box_iou(wrap("[0, 0, 10, 10]"), [5, 0, 15, 10], solution_frame="model") == pytest.approx(50 / 150)
    assert box_iou(wrap("[0, 0, 10, 10]"), "[20, 20, 30, 30]", solution_frame="model") == 0.0
    assert box_iou(wrap("[10, 10, 0, 0]"), [0, 0, 10, 10], solution_frame="model") == 0.0  # no area
    assert box_iou(wrap("somewhere left"), [0, 0, 10, 10], solution_frame="model") is NoScore
    assert box_iou(wrap("[1, 2, 3]"), [0, 0, 10, 10], solution_frame="model") is NoScore
    with pytest.raises(ValueError, match="needs extras family and image_size"):
        box_iou(wrap("[0, 0, 10, 10]"), [0, 0, 10, 10])
    with pytest.raises(ValueError, match="is not a box"):
        box_iou(wrap("[0, 0, 10, 10]"), [0, 0, 0, 10], solution_frame="model")


def test_iou_symmetry_and_identity():
    a, b = (0, 0, 4, 4), (2, 2, 6, 6)
    assert iou(a, b) == iou(b, a) == pytest.approx(4 / 28)
    assert iou(a, a) == 1.0


def test_every_family_has_a_box_frame():
    assert set(BOX_FRAMES) == set(FAMILIES)
    assert BOX_FRAMES["qwen2_5_vl"] == "resized_pixels"
    assert {BOX_FRAMES[f] for f in FAMILIES if f != "qwen2_5_vl"} == {"norm1000"}


@pytest.mark.parametrize(
    ("answer", "solution", "expected"),
    [
        ("2.5 - 7.0 seconds", [2.5, 7.0], 1.0),
        ("[2.5, 7.0]", (2.5, 7.0), 1.0),
        ("from 2.5s to 7s", "2.5-7", 1.0),
        ("The event happens between 2 and 6 seconds.", [4, 8], 2 / 6),
        ("0 - 1", [4, 8], 0.0),
        ("6 - 2", [2, 6], 0.0),  # ends before it starts
        ("3 - 3", [3, 3], 1.0),  # a point on the same point
        ("3 - 3", [2, 4], 0.0),
        ("at the end", [2, 6], NoScore),
        ("7.0", [2, 6], NoScore),
    ],
)
def test_temporal_iou(answer, solution, expected):
    got = temporal_iou(wrap(answer), solution)
    assert got is NoScore if expected is NoScore else got == pytest.approx(expected)


def test_temporal_iou_bad_solution_raises():
    with pytest.raises(ValueError, match="not a span"):
        temporal_iou(wrap("1 - 2"), [5, 3])


def test_table_weighted_sums_and_no_score_counts():
    table = RewardTable([("format", 0.5), ("number", 2.0)])
    completions = [wrap("7"), "7", wrap("seven"), "<think>cut"]
    result = table.score_group(completions, "7", "s1")
    assert result.scores == {"format": [1.0, 0.0, 1.0, 0.0], "number": [1.0, 1.0, None, None]}
    assert result.no_score == {"format": 0, "number": 2}
    assert result.totals == pytest.approx([0.5 + 2.0, 2.0, 0.5, 0.0])  # a NoScore adds 0
    logged = result.log_values()
    assert logged["rewards/number/mean"] == 1.0 and logged["rewards/number/no_score"] == 2.0
    assert logged["rewards/format/mean"] == 0.5 and logged["rewards/total/mean"] == pytest.approx(5.0 / 4)
    table.score([wrap("1"), "x"], ["1", "2"], ["s2", "s3"])
    assert table.summary() == {"format": {"scored": 6, "no_score": 0}, "number": {"scored": 3, "no_score": 3}}


def test_table_passes_extras_and_recipe_keywords():
    table = build_rewards([{"name": "box_iou", "solution_frame": "original", "weight": 3.0}])
    frame = {"family": "qwen2_vl", "image_size": IMAGE, "dataset": "refcoco"}  # unknown columns are ignored
    result = table.score([wrap("(100,100),(500,500)")], [BOX], ["r1"], [frame])
    assert result.totals == [3.0]


def test_no_score_survives_pickling():
    assert pickle.loads(pickle.dumps(NoScore)) is NoScore
    assert repr(NoScore) == "NoScore"


def raises(completion, solution, **extras):
    raise KeyError("bbox")


def nan(completion, solution, **extras):
    return math.nan


def test_a_raising_reward_is_one_error_line_with_the_sample():
    table = RewardTable([("format", 1.0), (raises, 1.0)])
    with pytest.raises(DataError) as err:
        table.score([wrap("a"), wrap("b")], ["a", "b"], ["s1", "s2"])
    assert str(err.value) == (
        "reward raises failed on sample s1: KeyError: 'bbox'. Fix the reward or the sample's solution; a reward "
        "returns NoScore when it cannot read an answer."
    )
    assert err.value.kind == "reward"


def test_a_nan_reward_is_one_error_line_with_the_sample():
    with pytest.raises(DataError) as err:
        RewardTable([(nan, 1.0)]).score_group([wrap("a")], "a", "clip-7")
    assert str(err.value) == (
        "reward nan returned nan for sample clip-7; a reward returns a finite number, or NoScore "
        "(finetune.evaluation.rewards.NoScore) when it cannot read the answer."
    )


@pytest.mark.parametrize(
    ("value", "said"), [(math.inf, "returned inf"), ("1.0", "returned a str"), (None, "returned None")]
)
def test_other_non_numbers_are_named(value, said):
    table = RewardTable([_named(lambda c, s, **e: value, "fixed")])
    with pytest.raises(DataError, match=f"^reward fixed {said} .*for sample s9; a reward returns a finite number"):
        table.score_group(["x"], "x", "s9")


def _named(fn, name):
    fn.__name__ = name
    return (fn, 1.0)


def test_a_bad_solution_names_the_reward_and_the_sample():
    with pytest.raises(DataError, match=r"^reward choice failed on sample q3: ValueError: the solution 'a cat' is"):
        build_rewards(["choice"]).score_group([wrap("B")], "a cat", "q3")


def test_bool_and_int_results_count_as_numbers():
    table = RewardTable([_named(lambda c, s, **e: c == s, "same"), _named(lambda c, s, **e: 2, "two")])
    assert table.score_group(["x", "y"], "x", "s").totals == [3.0, 2.0]


def test_build_rewards_from_recipe_entries():
    table = build_rewards(["format", {"name": "number", "weight": 0.5, "rel_tol": 0.0, "label": "number_exact"}])
    assert table.names == ["format", "number_exact"]
    assert table.score_group([wrap("100.5")], 100, "s").totals == [1.0]  # exact: number gives 0
    assert [r.name for r in RewardTable([("choice", 1.0)]).rewards] == ["choice"]


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (
            [{"name": "number", "rel_tolerance": 0.1}],
            "reward number: unknown keyword(s) rel_tolerance; it takes abs_tol, rel_tol",
        ),
        (["number", "number"], "reward number is named twice; give each a distinct `label`"),
        ([{"name": "format", "weight": "high"}], "reward format: weight 'high' is not a finite number"),
        ([{"name": "format", "weight": math.nan}], "reward format: weight nan is not a finite number"),
        ([{"weight": 1.0}], "reward entry {'weight': 1.0}: give a name"),
        ([], "no rewards: name at least one"),
        (["fromat"], "unknown reward 'fromat'; did you mean format? shipped: format, choice"),
    ],
)
def test_build_rewards_refusals(specs, message):
    with pytest.raises(ConfigError) as err:
        build_rewards(specs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_shipped_rewards_are_loaded_by_name():
    assert all(load_reward(name) is fn for name, fn in SHIPPED.items())


USER_FILE = """
from finetune.evaluation.rewards import NoScore

THRESHOLD = 0.5


def score(completion, solution, **extras):
    if "?" in completion:
        return NoScore
    return float(completion.strip() == solution) * extras.get("scale", 1.0)


def plain(completion, solution, difficulty=1):
    return 1.0 / difficulty
"""


def test_user_reward_from_a_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    table = build_rewards([f"{path}:score", {"name": f"{path}:plain", "weight": 2.0}])
    result = table.score(["yes", "yes?", "no"], ["yes"] * 3, ["a", "b", "c"], [{"scale": 3.0, "difficulty": 4}] * 3)
    # plain takes no **extras: it gets `difficulty`, not `scale`
    assert result.totals == pytest.approx([3.0 + 0.5, 0.0 + 0.5, 0.0 + 0.5])
    assert result.no_score == {f"{path}:score": 1, f"{path}:plain": 0}


def test_user_reward_by_relative_path_and_base_dir(tmp_path):
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "mine.py").write_text(USER_FILE)
    assert load_reward("rw/mine.py:score", base_dir=tmp_path)("a", "a") == 1.0


def test_user_reward_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "team_rewards_mod.py").write_text(USER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("team_rewards_mod:score")("a", "b") == 0.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{dir}/missing.py:score", "reward {dir}/missing.py:score: no file {dir}/missing.py; give the path to an existing .py file."),
        ("{dir}/my_rewards.py:scor", "reward {dir}/my_rewards.py:scor: {dir}/my_rewards.py has no `scor` (its functions: plain, score); name a function defined there."),
        ("{dir}/my_rewards.py:THRESHOLD", "reward {dir}/my_rewards.py:THRESHOLD: `THRESHOLD` is a float, not a function; name a function `def reward(completion, solution, **extras) -> float` (or NoScore)."),
        ("{dir}/broken.py:score", "reward {dir}/broken.py:score: importing {dir}/broken.py failed: NameError: name 'undefined_name' is not defined; fix that file."),
        ("no_such_reward_module:score", "reward no_such_reward_module:score: no module no_such_reward_module (ModuleNotFoundError: No module named 'no_such_reward_module'); put it on PYTHONPATH, or name its file: path/to/file.py:function."),
        ("{dir}/my_rewards.py:", "unknown reward '{dir}/my_rewards.py:'"),
    ],
)  # fmt: skip
def test_user_reward_import_errors(tmp_path, spec, message):
    (tmp_path / "my_rewards.py").write_text(USER_FILE)
    (tmp_path / "broken.py").write_text("x = undefined_name\n")
    with pytest.raises(ConfigError) as err:
        load_reward(spec.format(dir=tmp_path))
    assert str(err.value).startswith(message.format(dir=tmp_path.resolve())) and "\n" not in str(err.value)


def test_user_reward_with_too_few_arguments(tmp_path):
    path = tmp_path / "one.py"
    path.write_text("def score(completion):\n    return 1.0\n")
    with pytest.raises(ConfigError, match=r"takes 1 positional argument\(s\); a reward is `def reward"):
        build_rewards([f"{path}:score"])


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("abcXdef", "abcdef", 1), ("abc", "abd", 1), ("aaaa", "aa", 2), ("ab", "ba", 2), ("same", "same", 0)],
)
def test_levenshtein_with_shared_ends(a, b, distance):
    assert levenshtein(a, b) == levenshtein(b, a) == distance
