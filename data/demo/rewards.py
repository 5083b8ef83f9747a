"""A reward of the GRPO demo (recipes/experiment/demo_grpo.yaml), loaded by path as users load theirs:
`is_option` pays for answering with one of the question's options at all (a colour for a colour question, a
direction for a direction question), whether right or wrong; the shipped `exact_match` pays for the right one. A
completion that is no option word is not scored (NoScore: counted and logged as rewards/is_option/no_score)."""

from finetune.evaluation.rewards import NoScore

OPTIONS = {"colour": ("red", "green", "blue", "yellow"), "direction": ("left", "right", "up", "down")}


def is_option(completion: str, solution, *, task: str, **extras):
    return 1.0 if completion.strip().lower() in OPTIONS[task] else NoScore
