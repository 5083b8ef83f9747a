"""Generation-based evaluation on the held-out split: greedy answers scored per task (finetune/evaluation/metrics.py).

    python -m finetune.evaluate [hydra overrides]     (the same overrides as the training run)

Loads the base model + the run's adapter (or a merged/exported directory via `--model DIR`), generates an
answer for every held-out sample with the recipe's encoder, budgets and position rule, and writes
`eval/predictions.jsonl` (id, task, question, reference, prediction) and `eval/metrics.json` in the run dir:
exact match after normalisation, token F1, option-letter accuracy for multiple-choice tasks, chance.
`evaluation.steps` runs the same evaluation during training (finetune/training/workflow.py) and logs it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from finetune.base.errors import ConfigError, DataError
from finetune.base.paths import resolve_data_file
from finetune.data.conversation import Sample
from finetune.evaluation.metrics import format_metrics, score
from finetune.recipe.data_settings import conversation_encoder, split_settings
from finetune.recipe.load import load_config
from finetune.recipe.schema import Config
from finetune.records.rundir import RunDir

logger = logging.getLogger("finetune.evaluate")
# What a rank asks when none of its questions in a batch can be encoded: ranks generate in lockstep.
STAND_IN = Sample("stand-in", [{"role": "user", "content": [{"type": "text", "text": "Hello?"}]}], "stand-in")


def split_prompt(sample: Sample) -> tuple[Sample, str]:
    """The conversation up to its last assistant turn, and that turn's text (the reference answer)."""
    last = sample.messages[-1]
    if last["role"] != "assistant":
        raise DataError(f"{sample.source}: an evaluation sample must end with the assistant's reference answer.")
    reference = "".join(b["text"] for b in last["content"] if b["type"] == "text")
    return Sample(sample.id, sample.messages[:-1], sample.source, sample.extra), reference


def question_of(prompt: Sample) -> str:
    """The text of the last user turn (what the predictions file shows as the question)."""
    user = [m for m in prompt.messages if m["role"] == "user"]
    return "".join(b["text"] for b in user[-1]["content"] if b["type"] == "text").strip() if user else ""


def generation_inputs(encoded: list, pad_token_id: int, rule, device) -> dict:
    """What `generate` is given for encoded prompts (evaluation and rollouts alike): left-padded (generation continues
    every row), without labels or position ids (generate derives the positions itself, through the installed rule)."""
    from finetune.model.batching import inference_batch

    batch = inference_batch(encoded, pad_token_id, rule, padding_side="left")
    for key in ("labels", "position_ids"):
        batch.pop(key)
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def generate_answers(
    model,
    encoder,
    prompts: list[Sample],
    batch_size: int,
    max_new_tokens: int,
    streamer=None,
    synced_gpus: bool = False,
    progress: bool = True,
) -> list[str]:
    """Greedy answers. `model` was loaded by `finetune.model.load.load_model`, so `generate` computes the prefill
    positions with the recipe's rope rule (the same function as training) and decodes from max + 1.
    `synced_gpus`: every rank keeps stepping until all have finished (needed under ZeRO-3)."""
    from tqdm import tqdm

    from finetune.model.rope import model_position_rule

    device = next(model.parameters()).device
    pad_id = encoder.tokenizer.pad_token_id
    rule = model_position_rule(model)
    answers: list[str | DataError] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        chunk = prompts[start : start + batch_size]
        encoded, failed = [], {}
        for i, prompt in enumerate(chunk):
            try:
                encoded.append(encoder.encode(prompt, generation_prompt=True))
            except DataError as err:  # media that fail to decode: this question goes unanswered, the rest go on
                logger.warning("cannot ask %s: %s", prompt.id, err)
                failed[i] = err
        if not encoded and not synced_gpus:
            answers += [failed[i] for i in range(len(chunk))]
            continue
        stand_in = not encoded  # every rank must still call generate: ask a text-only question, keep no answer
        encoded = encoded or [encoder.encode(STAND_IN, generation_prompt=True)]
        batch = generation_inputs(encoded, pad_id, rule, device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            streamer=streamer,
            synced_gpus=synced_gpus,
        )
        texts = iter(
            []
            if stand_in
            else encoder.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        )
        answers += [failed[i] if i in failed else next(texts) for i in range(len(chunk))]
    return answers


def predict_samples(
    model,
    encoder,
    samples: list[Sample],
    batch_size: int,
    max_new_tokens: int,
    synced_gpus: bool = False,
    progress: bool = True,
) -> list[dict]:
    """One record per sample: id, task, question, reference, prediction (answers stripped)."""
    prompts, references = zip(*(split_prompt(s) for s in samples)) if samples else ((), ())
    answers = generate_answers(
        model, encoder, list(prompts), batch_size, max_new_tokens, synced_gpus=synced_gpus, progress=progress
    )
    records = []
    for s, p, ref, ans in zip(samples, prompts, references, answers):
        record = {"id": s.id, "task": str(s.extra.get("task", "all")), "question": question_of(p), "reference": ref}
        records.append(
            record
            | ({"prediction": None, "error": str(ans)} if isinstance(ans, DataError) else {"prediction": ans.strip()})
        )
    return records


def write_results(out_dir: Path, records: list[dict]) -> dict:
    """predictions.jsonl and metrics.json in `out_dir`; returns the metrics of the answered samples, with the ids of
    those that could not be asked (their media failed to decode) under `unanswered`."""
    answered = [r for r in records if r.get("error") is None]
    if not answered:
        raise DataError(
            f"none of the {len(records)} evaluation samples could be asked (their media failed to "
            f"decode), e.g. {records[0]['error']}"
        )
    metrics = score(answered)
    metrics["unanswered"] = [r["id"] for r in records if r.get("error") is not None]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def eval_samples(config: Config, encoder) -> list[Sample]:
    """The held-out split, checked and counted like training data, cut to `data.eval_max_samples`."""
    from finetune.data.prepare import prepare_split, require_clean

    if not config.data.eval:
        raise ConfigError("No held-out split: set data.eval=PATH.")
    split = prepare_split(config.data.eval, split_settings(config), encoder, resolve_data_file)
    require_clean(split, "evaluation", config.data.skip_invalid, logger)
    samples = split.samples[: config.data.eval_max_samples] if config.data.eval_max_samples else split.samples
    if not samples:
        raise DataError(f"data.eval={config.data.eval} holds no usable samples.")
    for s in samples:
        split_prompt(s)  # every sample must end with its reference answer: fail before generating anything
    return samples


def evaluate(config: Config, model_dir: str | None = None) -> dict:
    from finetune.model.load import load_trained_model

    if not config.data.eval:
        raise ConfigError("No held-out split: set data.eval=PATH.")
    model, processor = load_trained_model(config, model_dir)
    model.eval()
    encoder = conversation_encoder(processor, config, for_training=False)
    samples = eval_samples(config, encoder)
    records = predict_samples(model, encoder, samples, config.evaluation.batch_size, config.evaluation.max_new_tokens)
    eval_dir = RunDir(config.trainer.output_dir).eval_dir
    metrics = write_results(eval_dir, records)
    print(format_metrics(metrics))
    if metrics["unanswered"]:  # scored without them: say so under the table, not only in a warning further up
        ids = metrics["unanswered"]
        print(
            f"{len(ids)} of {len(records)} evaluation samples could not be asked (their media failed to decode) and "
            f"are not scored: {', '.join(map(str, ids[:5]))}{', ...' if len(ids) > 5 else ''}; their errors are in "
            f"{eval_dir / 'predictions.jsonl'}"
        )
    return metrics


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="evaluate this merged/exported model directory instead of the adapter")
    args, overrides = parser.parse_known_args(argv)
    evaluate(load_config(overrides), args.model)
