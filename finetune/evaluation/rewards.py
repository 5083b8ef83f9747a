"""Rewards for RL with verifiable answers (GRPO family): the shipped ones, users' own by import path, and the table
that applies a recipe's list of them to a group of completions.

A reward is `reward(completion: str, solution, **extras) -> float | NoScore`: `completion` the generated text,
`solution` the sample's `solution` column, `extras` the sample's other columns and what the trainer adds
(`family`, image sizes: see `box_iou`). A reward that cannot read an answer from the completion returns `NoScore`
(counted and reported, scored 0 in the sum); a reward that raises, or returns NaN, infinity or anything but a
number or NoScore, stops the run with one line naming the reward and the sample (`DataError`, kind "reward"). A
solution a reward cannot read is the data's fault, not the completion's: it raises (one line, with the sample).

Answers are read by one extractor (`answer_text`): the last `<answer>...</answer>` when there is one; else the text
after the last `</think>`; else the whole completion. An `<answer>` or `<think>` left open (generation cut at its
length limit) has no answer: NoScore. `choice` and `number` then prefer the last `\\boxed{...}` in that text.

Shipped (`SHIPPED`; recipe keywords in brackets):
- `format`: 1.0 when the completion is `<think>...</think><answer>...</answer>` and nothing else (whitespace
  around and between the blocks allowed, one of each tag), else 0.0; never NoScore. The R1 format reward
  (VLM-R1, Video-R1: `re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text, re.DOTALL)`), stricter
  about repeated tags. [`opened_in_prompt`: true where the chat template already opened `<think>` in the prompt
  (thinking models), so the completion starts inside it.]
- `choice`: the option letter A-Z the answer states ("B", "(B)", "B.", "B) text", "The answer is B", "... so the
  answer is (B).") == the solution's letter. NoScore: no letter stated.
- `number`: the answer's last number (ints, decimals, thousands separators "1,234", fractions "3/4" and
  `\\frac{3}{4}`, percentages, scientific notation, `\\boxed{}`) equals the solution's within `rel_tol` (relative,
  default 1e-2; 0 for exact) or `abs_tol` (default 0). A percentage "50%" matches 50 or 0.5. NoScore: no number.
- `exact_match`, `f1`: the evaluation metrics (finetune/evaluation/metrics.py: normalised equality; SQuAD token F1).
  A solution that is a list of acceptable answers scores the best of them (also `edit_distance`).
- `edit_distance`: 1 - Levenshtein(answer, solution) / max(len) on characters, whitespace runs collapsed (OCR).
  [`normalise_text`: compare metrics.normalise'd text (case, surrounding punctuation) instead.]
- `box_iou`: IoU of the answer's first box [x1, y1, x2, y2] with the solution's, in the family's frame (`BOX_FRAMES`:
  Qwen2.5-VL pixels of the resized image, the others 0-1000). [`solution_frame`: "original" (default; the solution
  in the image file's pixels, converted with the extras `family`, `image_size` and, for Qwen2.5-VL, `resized_size`,
  each (width, height)) or "model" (the solution already in the family's frame).] NoScore: no box of four numbers.
- `temporal_iou`: IoU of the answer's [start, end] seconds with the solution's (video grounding). NoScore: no span.

Users' rewards (`load_reward`): `module.path:function` (imported by name from the Python path) or
`path/to/file.py:function` (that file, by path, relative to the recipe's base directory or the working one). Only the
module or file the recipe names is imported: no scanning, no entry points.

Arguments: a reward gets the sample's extras as keywords, then the recipe's keywords for it (`rel_tol`, ...), which
win over a column of the same name; a user's function without `**extras` gets only the columns it names.

Combination (`RewardTable`): each completion's reward is the weighted sum of its rewards' scores, a NoScore adding
0; per reward, the table counts the completions it could not score (the trainer logs them per step, the run
summary reports the totals). A sum, not a mean over the scored rewards: an unreadable answer earns nothing from
that reward, so the policy is never paid for answers the reward cannot read.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune.base.errors import ConfigError, DataError
from finetune.base.families import FAMILIES
from finetune.evaluation.metrics import choice_letter, normalise, token_f1


class _NoScore:
    """The one value a reward returns when it cannot read the completion's answer."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NoScore"

    def __reduce__(self):  # stays the same object through pickling (DataLoader workers, ranks)
        return (_NoScore, ())


NoScore = _NoScore()

# ---------------------------------------------------------------------------------------------------------------
# The answer


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_text(completion: str) -> str | None:
    """The completion's answer: the last complete `<answer>...</answer>` (stripped), else the text after the last
    `</think>`, else the whole completion (stripped); None when an `<answer>` or `<think>` is left open."""
    answers = _ANSWER.findall(completion)
    if answers:
        return answers[-1].strip()
    if "<answer>" in completion:
        return None  # opened and cut off: the answer is incomplete
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1].strip()
    if "<think>" in completion:
        return None  # still thinking when generation stopped
    return completion.strip()


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _final(completion: str) -> str | None:
    text = answer_text(completion)
    if text is None:
        return None
    boxed = _boxed(text)
    return text if boxed is None else boxed


# ---------------------------------------------------------------------------------------------------------------
# format


def format_reward(completion: str, solution=None, *, opened_in_prompt: bool = False, **extras) -> float:
    """1.0 for exactly `<think>...</think><answer>...</answer>` (whitespace around the blocks allowed), else 0.0."""
    text = completion.strip()
    if opened_in_prompt:
        text = "<think>" + text
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if any(text.count(tag) != 1 for tag in tags):
        return 0.0
    return float(re.fullmatch(r"<think>.*</think>\s*<answer>.*</answer>", text, re.DOTALL) is not None)


# ---------------------------------------------------------------------------------------------------------------
# choice

# "... so the answer is (B).", "Answer: B": an option stated after other text (choice_letter reads from the start).
_STATED = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*:?\s*(?:\(([A-Z])\)|([A-Z])(?=$|[\s.,;:!)]))")


def _stated_letter(text: str) -> str | None:
    letter = choice_letter(text, last="Z")
    if letter:
        return letter
    for match in reversed(list(_STATED.finditer(text))):
        letter = match.group(1) or match.group(2)
        rest = text[match.end() :]
        if match.group(2) in ("A", "I") and re.match(r"\s+[a-z]", rest):
            continue  # "the answer is A dog", "the answer is I think": a word, not an option
        return letter
    return None


def choice(completion: str, solution, **extras) -> float | _NoScore:
    """1.0 when the answer's option letter is the solution's, 0.0 when another; NoScore when it states none."""
    want = choice_letter(str(solution), last="Z")
    if want is None:
        raise ValueError(f"the solution {str(solution)!r} is not an option letter (A-Z, e.g. 'B' or '(B)')")
    text = _final(completion)
    letter = None if text is None else _stated_letter(text)
    return NoScore if letter is None else float(letter == want)


# ---------------------------------------------------------------------------------------------------------------
# number

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?"
_SIGN = r"(?:(?<![\w.)\]}])[-+])?"  # a sign, not a minus between two terms ("2-5")
_NUMBER = re.compile(
    rf"(?P<fsign>{_SIGN})\\d?frac\{{\s*(?P<fnum>{_NUM})\s*\}}\{{\s*(?P<fden>{_NUM})\s*\}}"  # \frac{3}{4}, \dfrac
    rf"|(?P<sign>{_SIGN})(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?(?P<pct>\s*\\?%)?"
)
# LaTeX spacing and money that sit inside numbers: "1{,}234", "1\,000", "$12.50", "−3" (Unicode minus).
_LATEX_NOISE = (("{,}", ","), ("\\,", ""), ("\\!", ""), ("\\$", ""), ("$", ""), ("\u2212", "-"))


def _value(text: str) -> float:
    return float(text.replace(",", ""))


def numbers_in(text: str) -> list[tuple[float, ...]]:
    """The numbers a text states, in order; each as its possible values (a percentage p% as p/100 and p)."""
    for noise, plain in _LATEX_NOISE:
        text = text.replace(noise, plain)
    found = []
    for m in _NUMBER.finditer(text):
        sign = -1.0 if (m["fsign"] or m["sign"] or "") == "-" else 1.0
        if m["fnum"] is not None:
            num, den = _value(m["fnum"]), _value(m["fden"])
        else:
            num, den = _value(m["num"]), (_value(m["den"]) if m["den"] else 1.0)
        if den == 0:
            continue  # "1/0" states no number
        value = sign * num / den
        found.append((value / 100, value) if m["pct"] else (value,))
    return found


def number(completion: str, solution, *, rel_tol: float = 1e-2, abs_tol: float = 0.0, **extras) -> float | _NoScore:
    """1.0 when the answer's last number equals the solution's within rel_tol (relative) or abs_tol, else 0.0;
    NoScore when the answer states no number."""
    if isinstance(solution, numbers.Real) and not isinstance(solution, bool):
        want = [(float(solution),)]
    else:
        want = numbers_in(_boxed(str(solution)) or str(solution))
    if not want:
        raise ValueError(f"the solution {str(solution)!r} states no number")
    text = _final(completion)
    got = numbers_in(text) if text is not None else []
    if not got:
        return NoScore
    return float(any(math.isclose(g, w, rel_tol=rel_tol, abs_tol=abs_tol) for g in got[-1] for w in want[-1]))


# ---------------------------------------------------------------------------------------------------------------
# exact_match, f1, edit_distance


def _references(solution) -> list[str]:
    """A solution as its acceptable answers: a string, or a list of them (the best one scores)."""
    refs = [str(s) for s in solution] if isinstance(solution, (list, tuple)) else [str(solution)]
    if not refs:
        raise ValueError("the solution is an empty list of answers")
    return refs


def exact_match(completion: str, solution, **extras) -> float | _NoScore:
    """1.0 when the normalised answer equals a normalised solution (metrics.normalise), else 0.0."""
    text = answer_text(completion)
    if text is None:
        return NoScore
    return float(any(normalise(text) == normalise(ref) for ref in _references(solution)))


def f1(completion: str, solution, **extras) -> float | _NoScore:
    """SQuAD token F1 of the answer against the solution (metrics.token_f1); the best over a list of solutions."""
    text = answer_text(completion)
    if text is None:
        return NoScore
    return max(token_f1(text, ref) for ref in _references(solution))


def levenshtein(a: str, b: str) -> int:
    """Characters inserted, deleted or substituted to turn a into b (two-row dynamic programme, O(len a * len b))."""
    # A shared prefix and suffix cost nothing (OCR answers are mostly right): only the middle needs the table.
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    a, b = a[start : len(a) - end], b[start : len(b) - end]
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_distance(completion: str, solution, *, normalise_text: bool = False, **extras) -> float | _NoScore:
    """1 - Levenshtein / max(len) of the answer and the solution (1.0 when both are empty), whitespace runs
    collapsed; with normalise_text, metrics.normalise'd (lower case, no surrounding punctuation)."""
    text = answer_text(completion)
    if text is None:
        return NoScore

    def clean(s: str) -> str:
        return normalise(s) if normalise_text else " ".join(s.split())

    def similarity(ref: str) -> float:
        a, b = clean(text), clean(ref)
        longest = max(len(a), len(b))
        return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest

    return max(similarity(ref) for ref in _references(solution))


# ---------------------------------------------------------------------------------------------------------------
# box_iou

# The frame each family writes boxes in (what its grounding data taught it):
#   "resized_pixels": absolute pixels of the image as the model saw it, after smart_resize (Qwen2.5-VL);
#   "norm1000": 0-1000, relative to the image's width and height (Qwen2-VL, Qwen3-VL, Qwen3.5).
# Qwen3.5 is taken to be Qwen3-VL's (the same processors and vision side, finetune/base/families.py); check its
# grounding data's convention before training it on boxes.
BOX_FRAMES = {
    "qwen2_vl": "norm1000",
    "qwen2_5_vl": "resized_pixels",
    "qwen3_vl": "norm1000",
    "qwen3_vl_moe": "norm1000",
    "qwen3_5": "norm1000",
    "qwen3_5_moe": "norm1000",
}
SOLUTION_FRAMES = ("original", "model")

_N = r"\s*([-+]?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(rf"\[{_N},{_N},{_N},{_N}\]|\({_N},{_N}\)\s*,?\s*\({_N},{_N}\)")  # [x1,y1,x2,y2]; (x1,y1),(x2,y2)


def box_in(text: str) -> tuple[float, float, float, float] | None:
    """The first box a text states: `[x1, y1, x2, y2]` (JSON, e.g. {"bbox_2d": [...]}) or Qwen2-VL's
    `(x1,y1),(x2,y2)`; None when it states none."""
    match = _BOX.search(text)
    if match is None:
        return None
    return tuple(float(v) for v in match.groups() if v is not None)  # type: ignore[return-value]


def _size(value, name: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_positive(v) for v in value):
        raise ValueError(f"extras {name}={value!r}: give (width, height) in pixels, both positive")
    return float(value[0]), float(value[1])


def _positive(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0


def box_to_model_frame(box, family: str, image_size, resized_size=None) -> tuple[float, float, float, float]:
    """A box [x1, y1, x2, y2] in pixels of the original image -> the frame `family` answers in (BOX_FRAMES).
    image_size: (width, height) of the original image. resized_size: (width, height) the model saw (smart_resize's
    result, finetune/data/vision.py, which returns (height, width)); needed for "resized_pixels" families only."""
    if family not in BOX_FRAMES:
        raise ValueError(f"extras family={family!r} is not one of {', '.join(BOX_FRAMES)}")
    width, height = _size(image_size, "image_size")
    if BOX_FRAMES[family] == "norm1000":
        sx, sy = 1000 / width, 1000 / height
    else:
        if resized_size is None:
            raise ValueError(
                f"{FAMILIES[family].title} answers in pixels of the resized image: pass extras resized_size="
                "(width, height) (or give the solution in that frame with solution_frame: model)"
            )
        new_width, new_height = _size(resized_size, "resized_size")
        sx, sy = new_width / width, new_height / height
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def _area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a, b) -> float:
    """Intersection over union of two boxes [x1, y1, x2, y2] (continuous coordinates; a box with x2 <= x1 or
    y2 <= y1 has no area)."""
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def box_iou(
    completion: str,
    solution,
    *,
    solution_frame: str = "original",
    family: str | None = None,
    image_size=None,
    resized_size=None,
    **extras,
) -> float | _NoScore:
    """IoU of the answer's first box with the solution's, both in the frame `family` answers in (BOX_FRAMES).

    solution: [x1, y1, x2, y2] (or a text stating one). solution_frame (recipe keyword): "original" (default: pixels
    of the image file, as RefCOCO-style data give them; converted with `box_to_model_frame`, so the trainer passes
    extras family, image_size and, for Qwen2.5-VL, resized_size) or "model" (already in the family's frame;
    nothing converted, no extras needed). NoScore: the answer states no box."""
    if solution_frame not in SOLUTION_FRAMES:
        raise ValueError(f"solution_frame={solution_frame!r}: use one of {', '.join(SOLUTION_FRAMES)}")
    want = box_in(str(solution)) if isinstance(solution, str) else solution
    if want is None or len(want) != 4 or _area(want) <= 0:
        raise ValueError(f"the solution {solution!r} is not a box [x1, y1, x2, y2] with x1 < x2 and y1 < y2")
    if solution_frame == "original":
        if family is None or image_size is None:
            raise ValueError(
                "box_iou with solution_frame original needs extras family and image_size (the trainer passes them); "
                "or give solutions in the model's frame with solution_frame: model"
            )
        want = box_to_model_frame(want, family, image_size, resized_size)
    text = _final(completion)
    got = None if text is None else box_in(text)
    return NoScore if got is None else iou(got, want)


# ---------------------------------------------------------------------------------------------------------------
# temporal_iou

_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(?:s|sec|secs|seconds)?\s*(?:-|–|—|to|,|and)\s*(\d+(?:\.\d+)?)")


def span_in(text: str) -> tuple[float, float] | None:
    """The first [start, end] seconds a text states: "2.5 - 7.0 seconds", "[2.5, 7.0]", "from 2.5s to 7s"."""
    match = _SPAN.search(text)
    return None if match is None else (float(match.group(1)), float(match.group(2)))


def temporal_iou(completion: str, solution, **extras) -> float | _NoScore:
    """IoU of the answer's [start, end] seconds with the solution's (0.0 for a span that ends before it starts);
    NoScore when the answer states no span."""
    want = span_in(str(solution)) if isinstance(solution, str) else tuple(float(v) for v in solution)
    if want is None or len(want) != 2 or want[1] < want[0]:
        raise ValueError(f"the solution {solution!r} is not a span [start, end] of seconds with start <= end")
    text = _final(completion)
    got = None if text is None else span_in(text)
    if got is None:
        return NoScore
    if got[1] < got[0]:
        return 0.0
    inter = max(0.0, min(got[1], want[1]) - max(got[0], want[0]))
    union = max(got[1], want[1]) - min(got[0], want[0])
    return inter / union if union > 0 else float(got == want)


# ---------------------------------------------------------------------------------------------------------------
# The table of shipped rewards, users' rewards, and the runner

SHIPPED: dict[str, Callable] = {
    "format": format_reward,
    "choice": choice,
    "number": number,
    "exact_match": exact_match,
    "f1": f1,
    "edit_distance": edit_distance,
    "box_iou": box_iou,
    "temporal_iou": temporal_iou,
}
USER_FORMS = "a user reward is `module.path:function` or `path/to/file.py:function`"


def _import_file(spec: str, path: Path) -> object:
    if not path.is_file():
        raise ConfigError(f"reward {spec}: no file {path.resolve()}; give the path to an existing .py file.")
    # A module name of its own per file (two recipes' rewards.py stay apart), the same in every process.
    name = f"finetune_user_reward_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward {spec}: {path} cannot be imported as Python; name a .py file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # as import does, so pickling and dataclasses inside it work
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ConfigError(f"reward {spec}: importing {path} failed: {_one_line(err)}; fix that file.") from err
    return module


def _import_module(spec: str, module_name: str) -> object:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"reward {spec}: no module {module_name} ({_one_line(err)}); put it on PYTHONPATH, or name its file: "
            "path/to/file.py:function."
        ) from err
    except Exception as err:
        raise ConfigError(f"reward {spec}: importing {module_name} failed: {_one_line(err)}; fix that module.") from err


def load_reward(spec: str, base_dir: Path | None = None) -> Callable:
    """The reward a recipe names: a shipped name (SHIPPED), `module.path:function` or `path/to/file.py:function`
    (relative to base_dir, else the working directory). Only the named module or file is imported: no search."""
    if spec in SHIPPED:
        return SHIPPED[spec]
    where, colon, attr = spec.rpartition(":")
    if not colon or not where or not attr:
        near = difflib.get_close_matches(spec, SHIPPED, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ConfigError(f"unknown reward {spec!r}; {hint}shipped: {', '.join(SHIPPED)}; {USER_FORMS}.")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        module = _import_file(spec, path if path.is_absolute() or base_dir is None else Path(base_dir) / path)
    else:
        module = _import_module(spec, where)
    if not hasattr(module, attr):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise ConfigError(
            f"reward {spec}: {where} has no `{attr}` (its functions: {', '.join(defined) or 'none'}); name a function "
            "defined there."
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(
            f"reward {spec}: `{attr}` is a {type(fn).__name__}, not a function; name a function "
            "`def reward(completion, solution, **extras) -> float` (or NoScore)."
        )
    return fn


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Reward:
    """One entry of a table: the reward's name (as the recipe wrote it), its function, weight and recipe keywords."""

    name: str
    fn: Callable
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) or not math.isfinite(self.weight):
            raise ConfigError(f"reward {self.name}: weight {self.weight!r} is not a finite number; give e.g. 1.0.")
        self.weight = float(self.weight)
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError) as err:  # some builtins and C extensions have none
            raise ConfigError(
                f"reward {self.name}: its signature cannot be read ({_one_line(err)}); wrap it in "
                "`def reward(completion, solution, **extras)`."
            ) from err
        self._takes_extras = any(p.kind is p.VAR_KEYWORD for p in params.values())
        positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params.values()):
            raise ConfigError(
                f"reward {self.name}: {getattr(self.fn, '__name__', self.fn)} takes {len(positional)} positional "
                "argument(s); a reward is `def reward(completion, solution, **extras) -> float`."
            )
        self._named = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        self._named -= {p.name for p in positional[:2]}
        # A shipped reward takes **extras for the sample's columns; its recipe keywords are its named ones only.
        open_kwargs = self._takes_extras and self.fn not in SHIPPED.values()
        unknown = sorted(set(self.kwargs) - self._named) if not open_kwargs else []
        if unknown:
            raise ConfigError(
                f"reward {self.name}: unknown keyword(s) {', '.join(unknown)}; it takes "
                f"{', '.join(sorted(self._named)) or 'none'} (besides name, weight and label)."
            )

    def __call__(self, completion: str, solution, extras: dict):
        extras = {k: v for k, v in extras.items() if k not in ("completion", "solution")}  # passed as arguments
        if not self._takes_extras:  # a user's function without **extras gets the columns it names
            extras = {k: v for k, v in extras.items() if k in self._named}
        return self.fn(completion, solution, **{**extras, **self.kwargs})  # the recipe's keywords win


@dataclass
class RewardScores:
    """What a table made of some completions: `totals` (the weighted sum per completion, a NoScore as 0),
    `scores` (per reward, per completion; None where it gave no score) and `no_score` (per reward, how many)."""

    totals: list[float]
    scores: dict[str, list[float | None]]
    no_score: dict[str, int]

    def log_values(self, prefix: str = "rewards") -> dict[str, float]:
        """Per reward its mean over the completions it scored, and its no-score count; the mean total."""
        values: dict[str, float] = {}
        for name, column in self.scores.items():
            scored = [s for s in column if s is not None]
            if scored:
                values[f"{prefix}/{name}/mean"] = sum(scored) / len(scored)
            values[f"{prefix}/{name}/no_score"] = float(self.no_score[name])
        if self.totals:
            values[f"{prefix}/total/mean"] = sum(self.totals) / len(self.totals)
        return values


class RewardTable:
    """A recipe's rewards, applied to completions. `totals`/`counts` accumulate over the run for its summary."""

    def __init__(self, rewards: Sequence[Reward | tuple]):
        self.rewards = [r if isinstance(r, Reward) else _entry(*r) for r in rewards]
        if not self.rewards:
            raise ConfigError("no rewards: name at least one (e.g. method.rewards: [format, choice]).")
        names = Counter(r.name for r in self.rewards)
        twice = sorted(n for n, c in names.items() if c > 1)
        if twice:
            raise ConfigError(
                f"reward {twice[0]} is named twice; give each a distinct `label` (e.g. label: number_loose)."
            )
        self.scored: Counter = Counter()
        self.no_score: Counter = Counter()

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def score(
        self,
        completions: Sequence[str],
        solutions: Sequence,
        sample_ids: Sequence[str],
        extras: Sequence[dict] | None = None,
        tally: bool = True,
    ) -> RewardScores:
        """Score completions[i] against solutions[i] with extras[i] (the sample's other columns and the trainer's
        frame facts); sample_ids[i] names it in errors. A group of G completions repeats its sample's values.
        `tally`: count them in the run's summary (training's completions; held-out evaluation's are not)."""
        n = len(completions)
        extras = [{}] * n if extras is None else extras
        if not len(solutions) == len(sample_ids) == len(extras) == n:
            raise ValueError(
                f"{n} completions, {len(solutions)} solutions, {len(sample_ids)} ids, {len(extras)} extras: give one each"
            )
        totals = [0.0] * n
        scores: dict[str, list[float | None]] = {}
        no_score: dict[str, int] = {}
        for reward in self.rewards:
            column = [self._one(reward, completions[i], solutions[i], sample_ids[i], extras[i]) for i in range(n)]
            for i, value in enumerate(column):
                if value is not None:
                    totals[i] += reward.weight * value
            scores[reward.name] = column
            no_score[reward.name] = sum(v is None for v in column)
            if tally:
                self.no_score[reward.name] += no_score[reward.name]
                self.scored[reward.name] += n - no_score[reward.name]
        return RewardScores(totals, scores, no_score)

    def score_group(
        self, completions: Sequence[str], solution, sample_id: str, extras: dict | None = None, tally: bool = True
    ):
        """The G completions of one prompt: its one solution, id and extras."""
        n = len(completions)
        return self.score(completions, [solution] * n, [sample_id] * n, [extras or {}] * n, tally)

    @staticmethod
    def _one(reward: Reward, completion: str, solution, sample_id: str, extras: dict) -> float | None:
        try:
            value = reward(completion, solution, extras)
        except Exception as err:
            raise DataError(
                f"reward {reward.name} failed on sample {sample_id}: {_one_line(err)}. Fix the reward or the "
                "sample's solution; a reward returns NoScore when it cannot read an answer.",
                kind="reward",
            ) from err
        if value is NoScore:
            return None
        if isinstance(value, numbers.Real) and math.isfinite(value):
            return float(value)
        if value is None:
            what = "None (no return statement?)"
        else:
            what = repr(value) if isinstance(value, numbers.Real) else f"a {type(value).__name__}"
        raise DataError(
            f"reward {reward.name} returned {what} for sample {sample_id}; a reward returns a finite number, or "
            "NoScore (finetune.evaluation.rewards.NoScore) when it cannot read the answer.",
            kind="reward",
        )

    def summary(self) -> dict[str, dict[str, int]]:
        """Per reward, the completions scored and not scored so far (the run summary's lines)."""
        return {name: {"scored": self.scored[name], "no_score": self.no_score[name]} for name in self.names}


def _entry(fn_or_name, weight: float = 1.0, kwargs: dict | None = None) -> Reward:
    if callable(fn_or_name):
        return Reward(getattr(fn_or_name, "__name__", repr(fn_or_name)), fn_or_name, weight, dict(kwargs or {}))
    return Reward(fn_or_name, load_reward(fn_or_name), weight, dict(kwargs or {}))


def build_rewards(specs: Sequence[str | dict], base_dir: Path | None = None) -> RewardTable:
    """The table a recipe's `method.rewards` names: each entry a name (shipped or user, weight 1) or a mapping
    {name, weight (default 1.0), label (the name in logs; default the name), any of the reward's keywords}."""
    rewards = []
    for spec in specs:
        if isinstance(spec, str):
            rewards.append(Reward(spec, load_reward(spec, base_dir)))
            continue
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(
                f"reward entry {spec!r}: give a name (format, number, my_rewards.py:score) or a mapping with `name`, "
                "e.g. {name: number, weight: 1.0, rel_tol: 0.01}."
            )
        kwargs = {k: v for k, v in spec.items() if k not in ("name", "weight", "label")}
        fn = load_reward(spec["name"], base_dir)
        rewards.append(Reward(str(spec.get("label") or spec["name"]), fn, spec.get("weight", 1.0), kwargs))
    return RewardTable(rewards)
