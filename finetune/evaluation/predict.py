"""Ask a trained model about an image or a video from the command line, or answer a whole file of questions.

    python -m finetune.predict --model runs/demo --video clip.mp4 --question "Which direction does the dot move?"
    python -m finetune.predict --model runs/demo/merged --image photo.jpg --question "What colour is it?" --max-pixels 200704
    python -m finetune.predict --model runs/demo --input questions.jsonl --output preds.jsonl

`--model` is a run directory (base model + `adapter/`), an adapter directory inside one, or an exported
(merged) folder. The recipe saved with it decides everything that shapes the input: image and video budgets,
chat template, M-RoPE rule, so the model is asked exactly as it was trained and evaluated. A folder without a
saved recipe (e.g. the original Qwen checkpoint) is asked with Qwen's default budgets and the qwen rule.
Per-item options override the recipe's budgets for this question: --fps, --nframes, --min-frames,
--max-frames, --min-pixels, --max-pixels, --total-pixels, --video-start, --video-end, --frames-fps (a folder of
frames). A single question streams its answer; `--input` takes records in any format training reads (a
reference answer, when present, is written beside the prediction) and shows a progress bar.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from finetune.base.errors import ConfigError, DataError
from finetune.base.families import FAMILIES
from finetune.data.conversation import Sample, record_to_sample, resolve_media
from finetune.recipe.load import load_config, load_saved_config
from finetune.recipe.schema import Config, ModelConfig
from finetune.records.rundir import RunDir

logger = logging.getLogger("finetune.predict")
OPTIONS = {
    "fps": float,
    "nframes": int,
    "min_frames": int,
    "max_frames": int,
    "min_pixels": int,
    "max_pixels": int,
    "total_pixels": float,
    "video_start": float,
    "video_end": float,
    "frames_fps": float,
}
IMAGE_OPTIONS = ("min_pixels", "max_pixels")
EMPTY_ANSWER = "(empty answer: the model generated no text)"


def find_model(path: str) -> tuple[Config, str | None]:
    """(recipe, merged model folder or None) for a run directory, an adapter directory or an exported folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"--model {path}: no such directory.")
    if (folder / "finetune_config.yaml").is_file():  # an export
        return load_saved_config(folder / "finetune_config.yaml"), str(folder)
    # the adapter folder of a run: its LoRA adapter, or the whole model of a run with no LoRA part (then the run's
    # recipe, not Qwen's default budgets, says how to ask it)
    in_run = (folder / "adapter_config.json").is_file() or folder == RunDir(folder.parent).adapter
    run_dir = folder.parent if in_run else folder
    if RunDir(run_dir).is_trained():
        config = load_saved_config(RunDir(run_dir).config_file)
        config.trainer.output_dir = str(run_dir)  # the run may have moved since it was trained
        return config, None
    if (folder / "config.json").is_file():
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type not in FAMILIES:
            titles = " and ".join(f.title for f in FAMILIES.values())
            raise ConfigError(f"--model {path} is a {model_type!r} model; predict asks {titles} models.")
        logger.warning("%s has no saved recipe: asking it with Qwen's default budgets and the qwen position rule", path)
        config = load_config(["evaluation.after_training=false", "export.after_training=false"])
        config.model = ModelConfig(name_or_path=str(folder), family=model_type)
        return config, str(folder)
    raise ConfigError(
        f"--model {path} is not a run directory (config.yaml + adapter/), an adapter directory inside "
        "one, or a model folder (config.json)."
    )


def question_sample(question: str, images: list[str], videos: list[str], options: dict) -> Sample:
    """One user turn: the media (each with the per-item options that apply to it), then the question."""
    blocks = []
    for kind, paths in (("image", images), ("video", videos)):
        for path in paths:
            resolved = resolve_media(str(Path(path).resolve()), Path(path).resolve().parent, f"--{kind} {path}")
            applicable = {k: v for k, v in options.items() if kind == "video" or k in IMAGE_OPTIONS}
            blocks.append({**applicable, "type": kind, kind: resolved})
    blocks.append({"type": "text", "text": question})
    return Sample("cli", [{"role": "user", "content": blocks}], "command line")


def read_questions(path: Path, media_root: Path) -> list[tuple[Sample, str | None]]:
    """(prompt, reference or None) per record of `path`; a record ending with an assistant turn has a reference."""
    from finetune.data.sources import iter_records
    from finetune.evaluation.evaluate import split_prompt

    questions = []
    for i, (where, record) in enumerate(iter_records(path)):
        if isinstance(record, DataError):
            raise record
        sample = record_to_sample(record, i, where, media_root, require_answer=False)
        if sample.messages[-1]["role"] == "assistant":
            questions.append(split_prompt(sample))
        else:
            questions.append((sample, None))
    return questions


def predict(args: argparse.Namespace) -> list[str]:
    import torch
    from transformers import TextStreamer

    from finetune.evaluation.evaluate import generate_answers, question_of
    from finetune.model.load import load_trained_model
    from finetune.recipe.data_settings import conversation_encoder

    config, merged_dir = find_model(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_trained_model(config, merged_dir, device_map="auto" if device == "cuda" else None)
    model.eval()
    encoder = conversation_encoder(processor, config, for_training=False)
    if args.input:
        source = Path(args.input)
        questions = read_questions(source, Path(args.media_root) if args.media_root else source.resolve().parent)
        prompts = [p for p, _ in questions]
        answers = generate_answers(model, encoder, prompts, args.batch_size, args.max_new_tokens)
        with open(args.output, "w") as f:
            for (prompt, reference), answer in zip(questions, answers):
                failed = isinstance(answer, DataError)
                record = {
                    "id": prompt.id,
                    "question": question_of(prompt),
                    "prediction": None if failed else answer.strip(),
                }
                record |= {"error": str(answer)} if failed else {}
                f.write(json.dumps(record | ({"reference": reference} if reference is not None else {})) + "\n")
        unanswered = sum(isinstance(a, DataError) for a in answers)
        empty = sum(not isinstance(a, DataError) and not a.strip() for a in answers)
        notes = []
        if unanswered:
            notes.append(f"{unanswered} could not be asked: their media failed to decode; see their `error`")
        if empty:
            notes.append(f"{empty} empty answer{'s' if empty != 1 else ''}: the model generated no text")
        print(
            f"wrote {len(answers)} predictions to {args.output}" + (f" ({'; '.join(notes)})" if notes else ""),
            file=sys.stderr,
        )
        return [None if isinstance(a, DataError) else a.strip() for a in answers]
    options = {key: cast(getattr(args, key)) for key, cast in OPTIONS.items() if getattr(args, key) is not None}
    prompt = question_sample(args.question, args.image or [], args.video or [], options)
    streamer = TextStreamer(encoder.tokenizer, skip_prompt=True, skip_special_tokens=True)
    answer = generate_answers(model, encoder, [prompt], 1, args.max_new_tokens, streamer=streamer, progress=False)[0]
    if isinstance(answer, DataError):
        raise answer
    if not answer.strip():  # the streamer printed nothing: say so (on stderr: stdout stays the answer itself)
        print(EMPTY_ANSWER, file=sys.stderr)
    return [answer.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run directory, an adapter directory or an exported folder")
    p.add_argument("--image", action="append", help="an image file (repeat for several)")
    p.add_argument("--video", action="append", help="a video file or a folder of frames (repeat for several)")
    p.add_argument("--question", help="what to ask about the media")
    p.add_argument("--input", help="a dataset file (.json/.jsonl/.parquet) of questions instead")
    p.add_argument("--output", help="where --input's predictions go (JSONL)")
    p.add_argument("--media-root", help="the folder --input's media paths are relative to (default: its folder)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call with --input")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    for key, cast in OPTIONS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=cast, help="per-item option (qwen-vl-utils' key)")
    return p


def main(argv: list[str]) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.input and (args.question or args.image or args.video):
        p.error("--input answers a file of questions; do not combine it with --question/--image/--video")
    if args.input and not args.output:
        p.error("--input needs --output (a JSONL file for the predictions)")
    if not args.input and not args.question:
        p.error("give --question (with --image/--video), or --input FILE --output FILE")
    predict(args)
