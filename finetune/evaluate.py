"""Generation-based evaluation on the held-out split: greedy answers, exact-match accuracy next to chance.

    python -m finetune.evaluate [hydra overrides]     (the same overrides as the training run)

Loads the base model + the run's adapter (or a merged/exported directory via `--model DIR`), generates an
answer for every held-out sample, and writes `eval/predictions.jsonl` and `eval/metrics.json` in the run dir.
Accuracy compares the normalised answer (lower case, no surrounding punctuation) with the reference; chance
is 1 / (distinct reference answers) per task, the accuracy of guessing uniformly among the known answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import string
import sys
from collections import defaultdict
from pathlib import Path

import torch

from finetune.cli import run
from finetune.config import Config, ConfigError, load_config
from finetune.data.conversation import DataError, Sample
from finetune.paths import resolve_data_file

logger = logging.getLogger("finetune.evaluate")


def normalise(text: str) -> str:
    return text.strip().strip(string.punctuation + " \n").lower()


def split_prompt(sample: Sample) -> tuple[Sample, str]:
    """The conversation up to its last assistant turn, and that turn's text (the reference answer)."""
    last = sample.messages[-1]
    if last["role"] != "assistant":
        raise DataError(f"{sample.source}: an evaluation sample must end with the assistant's reference answer.")
    reference = "".join(b["text"] for b in last["content"] if b["type"] == "text")
    return Sample(sample.id, sample.messages[:-1], sample.source, sample.extra), reference


def load_trained_model(config: Config, model_dir: str | None = None):
    """(model, processor) from a merged directory, or base model + the run's adapter."""
    from finetune.modeling import inference_device_map, load_model, load_processor, resolve_precision, uses_gpu

    precision = resolve_precision(config.trainer.precision, uses_gpu(config))
    device_map = inference_device_map(config)
    if model_dir:
        model = load_model(config.model, precision, path=model_dir, device_map=device_map)
        return model, load_processor(config.model, path=model_dir)
    adapter_dir = Path(config.trainer.output_dir) / "adapter"
    if not adapter_dir.is_dir():
        raise ConfigError(f"No trained adapter at {adapter_dir}; train first (./launch.sh with the same overrides).")
    processor = load_processor(config.model, path=str(adapter_dir))
    if config.peft.method == "none":
        return load_model(config.model, precision, path=str(adapter_dir), device_map=device_map), processor
    from peft import PeftModel

    base = load_model(config.model, precision, device_map=device_map)
    return PeftModel.from_pretrained(base, str(adapter_dir)), processor


@torch.no_grad()
def generate_answers(model, encoder, prompts: list[Sample], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers. `model` was loaded by `finetune.modeling.load_model`, so `generate` computes the prefill
    positions with the recipe's rope rule (the same function as training) and decodes from max + 1."""
    from tqdm import tqdm

    from finetune.batching import inference_batch
    from finetune.rope import model_position_rule

    device = model.device
    pad_id = encoder.tokenizer.pad_token_id
    rule = model_position_rule(model)
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="evaluate", unit="batch"):
        encoded = [encoder.encode(p, generation_prompt=True) for p in prompts[start : start + batch_size]]
        batch = inference_batch(encoded, pad_id, rule, padding_side="left")  # left: generation continues every row
        for key in ("labels", "position_ids"):  # generate derives the positions itself, through the installed rule
            batch.pop(key)
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers += encoder.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def score(samples: list[Sample], references: list[str], answers: list[str]) -> dict:
    by_task = defaultdict(lambda: {"n": 0, "correct": 0, "answers": set()})
    for sample, ref, ans in zip(samples, references, answers):
        task = by_task[str(sample.extra.get("task", "all"))]
        task["n"] += 1
        task["correct"] += normalise(ans) == normalise(ref)
        task["answers"].add(normalise(ref))
    tasks = {
        name: {"n": t["n"], "accuracy": t["correct"] / t["n"], "chance": 1 / len(t["answers"])}
        for name, t in sorted(by_task.items())
    }
    total = sum(t["n"] for t in tasks.values())
    return {
        "n": total,
        "accuracy": sum(t["accuracy"] * t["n"] for t in tasks.values()) / total,
        "chance": sum(t["chance"] * t["n"] for t in tasks.values()) / total,
        "tasks": tasks,
    }


def evaluate(config: Config, model_dir: str | None = None) -> dict:
    from finetune.data.encode import ConversationEncoder
    from finetune.data.prepare import prepare_split, require_clean

    if not config.data.eval:
        raise ConfigError("No held-out split: set data.eval=PATH.")
    model, processor = load_trained_model(config, model_dir)
    model.eval()
    encoder = ConversationEncoder.from_recipe(processor, config, for_training=False)
    split = prepare_split(config.data.eval, config.data, encoder, config.trainer.seed, resolve_data_file)
    require_clean(split, "evaluation", config.data.skip_invalid, logger)
    samples = split.samples[: config.data.eval_max_samples] if config.data.eval_max_samples else split.samples
    prompts, references = zip(*(split_prompt(s) for s in samples))
    answers = generate_answers(model, encoder, list(prompts), config.evaluation.batch_size,
                               config.evaluation.max_new_tokens)  # fmt: skip
    metrics = score(samples, list(references), answers)

    out_dir = Path(config.trainer.output_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for s, ref, ans in zip(samples, references, answers):
            f.write(json.dumps({"id": s.id, "task": s.extra.get("task"), "reference": ref, "prediction": ans}) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(format_metrics(metrics))
    return metrics


def format_metrics(metrics: dict) -> str:
    lines = [f"{'task':<12} {'n':>5} {'accuracy':>9} {'chance':>7}"]
    for name, t in metrics["tasks"].items():
        lines.append(f"{name:<12} {t['n']:>5} {t['accuracy']:>9.3f} {t['chance']:>7.3f}")
    lines.append(f"{'overall':<12} {metrics['n']:>5} {metrics['accuracy']:>9.3f} {metrics['chance']:>7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="evaluate this merged/exported model directory instead of the adapter")
    args, overrides = parser.parse_known_args(argv)
    return run(lambda: evaluate(load_config(overrides), args.model))

if __name__ == "__main__":
    sys.exit(main())
