"""Export: the trained weights as one model folder, proven to load, match and be fed alike. A LoRA run's adapter is
merged into the base weights; a run with no LoRA part (`parts.llm=full`, ...) saved its whole model in the run
directory (`adapter/`, finetune/records/rundir.py), which is exported as it is. Both get everything below.

    python -m finetune.export [hydra overrides]       (the same overrides as the training run)

Writes `export.output_dir` (default `<run>/merged`, refused if it exists unless `export.overwrite=true`):
safetensors weights in `export.dtype` (shards of `export.max_shard_size`) in the published checkpoints' key and
tensor layout (the one vLLM's loader maps: `model.visual.*`, `model.language_model.*`, `lm_head.weight` unless the
embeddings are tied; fused experts as the checkpoints store them: Qwen3-VL-MoE's transposed, Qwen3.5-MoE's one
tensor per expert, finetune/model/checkpoint_layout.py),
config, generation config,
tokenizer, chat template, the processor configs holding the recipe's image/video budgets (finetune/exporting/serving.py),
the resolved recipe (`finetune_config.yaml`) and a model card (`README.md`: data, evaluation, how to load and
serve with transformers or vLLM). Files are readable by everyone (0644).

A LoRA merge is checked in memory first (merged vs adapter logits in the training precision). A QLoRA run
(`model.quantization=nf4`) trained on a 4-bit base: its adapter is merged into a freshly loaded 16-bit base, never into
the 4-bit weights (`merge_into_16_bit_base`), and the export is checked twice: against the 16-bit base + adapter with
the tolerances below (the merge is exact), and against the trained 4-bit model within twice the 4-bit base's own error
on the same batch (`quantization` in the report; the export cannot be closer to the trained model than the 4-bit
weights are to the 16-bit ones). Then a fresh Python
process that imports only torch and transformers reloads the folder and
  - computes logits on a real batch from the held-out (or training) split, given the recipe's position ids:
    they must match the trained model's (the adapter model, or the fully trained one; 1e-4 in fp32; with half
    precision on either side 5 % of the logit scale; `export.atol` overrides);
  - gives back the merged weights that the published layout stores otherwise than transformers holds them
    (fingerprints of every such tensor, finetune/model/checkpoint_layout.py: transformers' loader must have
    transposed them back or fused them again);
  - runs the folder's own processor on real images and videos of the data: the grids it gives must be the
    ones training used (a mismatch is reported and stops the export). Where transformers cannot decode a video
    file here (it needs torchcodec, which needs the system FFmpeg), the processor is given the frames and metadata
    it would have read from the file, decoded by our loader (finetune/exporting/videos.py); so is a video its loader
    reads at another frame rate than training (`served_grids.other_frame_rate` names them, as the model card does).
Both results go to `export_report.json`, with how the videos were checked (`served_grids.video_input`: file or
frames). `export.push_to_hub=user/name` uploads the folder afterwards.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from finetune.base.errors import ConfigError
from finetune.base.families import family_of
from finetune.base.paths import resolve_data_file
from finetune.model.checkpoint_layout import published_layout, published_names, weight_fingerprint
from finetune.recipe.load import load_config, to_yaml
from finetune.recipe.schema import Config
from finetune.records.rundir import RunDir

logger = logging.getLogger("finetune.export")
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "finetune_config.yaml",
    "README.md",
)
MAX_CHECKED_MEDIA = 8  # per kind, for the served-grid check

# Runs in a separate interpreter with no project code: what a user of the exported model has.
RELOAD_SCRIPT = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.image_utils import load_image
model_dir, batch_file, media_file, frames_file, out_file, grids_file, weights_file, dtype, device_map = sys.argv[1:10]
processor = AutoProcessor.from_pretrained(model_dir)
grids = {"image": [], "video": []}
media = json.load(open(media_file))
for path in media["image"]:
    grids["image"].append(processor.image_processor(images=[load_image(path)])["image_grid_thw"][0].tolist())
frames = load_file(frames_file) if media["frames"] else {}
for video in media["video"]:
    if video["frames"] is None:  # the file itself, decoded by transformers
        out = processor.video_processor(videos=[video["path"]], return_metadata=True)
    else:  # transformers cannot decode files here: the frames its sample_frames picks, with the file's metadata
        out = processor.video_processor(
            videos=[frames[video["frames"]]], video_metadata=[video["metadata"]], do_sample_frames=False,
            return_metadata=True)
    grids["video"].append([*out["video_grid_thw"][0].tolist(), float(out["video_metadata"][0].sampled_fps)])
json.dump(grids, open(grids_file, "w"))
model = AutoModelForImageTextToText.from_pretrained(
    model_dir, dtype=getattr(torch, dtype), device_map=None if device_map == "none" else device_map
).eval()
batch = {k: v.to(model.device) for k, v in load_file(batch_file).items()}
if "second_per_grid_ts" in batch:
    batch["second_per_grid_ts"] = batch["second_per_grid_ts"].tolist()
with torch.no_grad():
    logits = model(**batch).logits.float().cpu()
save_file({"logits": logits.contiguous()}, out_file)
wanted = set(json.load(open(weights_file)))
params = dict(model.named_parameters())
json.dump({name: weight_fingerprint(params[name]) for name in wanted}, open(weights_file, "w"))
"""
RELOAD_SCRIPT = inspect.getsource(weight_fingerprint) + RELOAD_SCRIPT  # the one definition, shared


def reference_samples(config: Config, max_samples: int = 64) -> list:
    from finetune.data.preference import conversations, data_kind, read_source_data
    from finetune.data.sources import parse_sources, read_source

    source = parse_sources(config.data.eval or config.data.train, config.data.media_root, resolve_data_file)[0]
    kind = data_kind(config.method.name)
    if kind is not None:  # preference or RL data: the first conversation of each item (a pair's chosen, an RL prompt)
        return [conversations(item)[0] for item in read_source_data(source, kind).items[:max_samples]]
    return read_source(source)[0][:max_samples]


def reference_batch(samples: list, encoder, rule, max_samples: int = 4) -> dict:
    """A small real batch with images and videos when the data has both (the export must handle both), with the
    recipe's position ids: plain transformers is given the positions training used."""
    from finetune.model.batching import inference_batch

    with_video = [s for s in samples if s.media("video")][: max_samples // 2]
    chosen = with_video + [s for s in samples if s not in with_video][: max_samples - len(with_video)]
    batch = inference_batch([encoder.encode(s) for s in chosen], encoder.tokenizer.pad_token_id, rule)
    batch.pop("labels")
    return batch


def training_grids(samples: list, encoder) -> dict:
    """{"image"/"video": {path: grid}} for media files that the recipe's budgets alone size (no per-item options,
    no frame folders): what the exported processor must reproduce. Videos: (t, h, w, sampled fps)."""
    from finetune.data.vision import FRAME_FACTOR, IMAGE_KEYS, PATCH, VIDEO_KEYS

    grids = {"image": {}, "video": {}}
    for sample in samples:
        for block, plan in zip(sample.media("image"), encoder.image_plans(sample)):
            if len(grids["image"]) < MAX_CHECKED_MEDIA and not set(block) & set(IMAGE_KEYS):
                grids["image"][plan.path] = [1, plan.height // PATCH, plan.width // PATCH]
        for block, (_, plan) in zip(sample.media("video"), encoder.video_plans(sample)):
            plain_file = isinstance(block["video"], str) and not set(block) & set(VIDEO_KEYS)
            if len(grids["video"]) < MAX_CHECKED_MEDIA and plain_file:
                t = -(-len(plan.indices) // FRAME_FACTOR)
                grids["video"][block["video"]] = [t, plan.height // PATCH, plan.width // PATCH, plan.sampled_fps]
    return grids


def grid_mismatches(expected: dict, served: dict) -> list[str]:
    problems = []
    for kind in ("image", "video"):
        for (path, want), got in zip(expected[kind].items(), served[kind]):
            same = want[:3] == got[:3] and (kind == "image" or abs(want[3] - got[3]) <= 1e-6 * want[3])
            if not same:
                problems.append(f"{kind} {path}: trained {want}, served {got}")
    return problems


def missing_files(out_dir: Path) -> list[str]:
    missing = [f for f in REQUIRED_FILES if not (out_dir / f).exists()]
    if not any(out_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if not ((out_dir / "chat_template.jinja").exists() or (out_dir / "chat_template.json").exists()):
        missing.append("chat_template.jinja")
    return missing


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder unless asked, and never empty a folder that is not an export."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"export.output_dir={out_dir} already exists and is not empty. Set export.overwrite=true "
            "to replace that export, or choose another export.output_dir."
        )
    if not (out_dir / "export_report.json").exists() and not (out_dir / "config.json").exists():
        raise ConfigError(
            f"export.output_dir={out_dir} holds files that are not an earlier export; export.overwrite "
            "only ever replaces an export. Choose another export.output_dir."
        )


def check_trained_dir(trained_dir: Path, config: Config) -> None:
    """The run directory must hold what the recipe trains: a LoRA adapter, or (no part in LoRA) the whole model."""
    has_adapter, has_model = (trained_dir / "adapter_config.json").exists(), (trained_dir / "config.json").exists()
    parts = " ".join(f"parts.{part}={mode}" for part, mode in config.parts.modes().items())
    if config.parts.uses_lora and not has_adapter and has_model:
        raise ConfigError(
            f"{trained_dir} holds a fully trained model, but the recipe trains LoRA ({parts}); export with the "
            "overrides the run was trained with (e.g. parts.llm=full)."
        )
    if not config.parts.uses_lora and has_adapter:
        raise ConfigError(
            f"{trained_dir} holds a LoRA adapter, but the recipe trains no part with LoRA ({parts}); export with "
            "the overrides the run was trained with (e.g. parts.llm=lora)."
        )
    if not (has_adapter if config.parts.uses_lora else has_model):
        what = "LoRA adapter" if config.parts.uses_lora else f"trained model ({parts})"
        raise ConfigError(f"No {what} at {trained_dir}; train first (./launch.sh with the same overrides).")


def check_adapter_base(adapter_dir: Path, base_path: str) -> None:
    """The adapter must have been trained on the recipe's base model: same name, or the same config.json."""
    trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not trained_on or trained_on == base_path:
        return
    fix = (
        f"Export with the recipe the adapter was trained with (model.name_or_path={trained_on}), or train an "
        f"adapter for {base_path}."
    )
    if not (Path(trained_on) / "config.json").is_file() or not (Path(base_path) / "config.json").is_file():
        raise ConfigError(
            f"{adapter_dir} was trained on {trained_on}, but the recipe's base model is {base_path}. " + fix
        )
    ignore = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}
    configs = [
        {k: v for k, v in json.loads((Path(p) / "config.json").read_text()).items() if k not in ignore}
        for p in (trained_on, base_path)
    ]
    if configs[0] != configs[1]:
        raise ConfigError(
            f"{adapter_dir} was trained on {trained_on}, a different model from the recipe's "
            f"{base_path} (their config.json differ). {fix}"
        )
    logger.info("adapter base %s is at %s now (same config.json)", trained_on, base_path)


def reload_check(
    out_dir: Path,
    batch: dict,
    expected_grids: dict,
    dtype: torch.dtype,
    device_map: str | None,
    weights: list[str] = (),
):
    """(logits, served grids, how the videos were checked, fingerprints of the `weights` as reloaded) computed by
    plain transformers on the export, in a separate interpreter. Where transformers cannot decode a video file here,
    it is given the frames and metadata it would have read (finetune/exporting/videos.py)."""
    from safetensors.torch import load_file, save_file

    from finetune.exporting.videos import (
        frames_for_transformers,
        how_videos_were_checked,
        rate_differences,
        transformers_decodes_video_files,
    )

    videos = list(expected_grids["video"])
    from_files = not videos or transformers_decodes_video_files()
    # Videos transformers' own loader reads at another rate than training: checked on the trained metadata (frames).
    other_rate = rate_differences(videos) if videos and from_files else []
    with tempfile.TemporaryDirectory() as tmp:
        names = ("batch.safetensors", "media.json", "frames.safetensors", "logits.safetensors", "grids.json")
        files = {name: Path(tmp) / name for name in (*names, "weights.json")}
        files["weights.json"].write_text(json.dumps(list(weights)))
        save_file(
            {k: (torch.tensor(v) if isinstance(v, list) else v).contiguous() for k, v in batch.items()},
            str(files["batch.safetensors"]),
        )
        as_frames = [d["path"] for d in other_rate] if from_files else videos
        frames, entries = frames_for_transformers(out_dir, as_frames) if as_frames else ({}, [])
        if frames:
            save_file(frames, str(files["frames.safetensors"]))
        by_path = {entry["path"]: entry for entry in entries}
        entries = [by_path.get(path, {"path": path, "frames": None}) for path in videos]
        media = {"image": list(expected_grids["image"]), "video": entries, "frames": bool(frames)}
        files["media.json"].write_text(json.dumps(media))
        cmd = [
            sys.executable,
            "-c",
            RELOAD_SCRIPT,
            str(out_dir),
            *(str(f) for f in files.values()),
            str(dtype).removeprefix("torch."),
            device_map or "none",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"plain transformers could not load {out_dir}:\n{result.stderr[-3000:]}")
        logits, served = (
            load_file(str(files["logits.safetensors"]))["logits"],
            json.loads(files["grids.json"].read_text()),
        )
        reloaded = json.loads(files["weights.json"].read_text())
    checked = (how_videos_were_checked(from_files, other_rate) if videos else None, from_files, other_rate)
    return logits, served, checked, reloaded


def save_published(model, out_dir: Path, max_shard_size) -> dict[str, list]:
    """Write the merged model in the published checkpoints' layout; returns the fingerprints of the parameters written
    otherwise than transformers holds them (transposed or split per expert, finetune/model/checkpoint_layout.py), by
    parameter name. transformers 5.23 already writes the published key names and leaves tied output embeddings out;
    for a family whose published layout transposes or splits some tensors, the state dict is given in that layout
    and transformers' own reverse conversion is skipped."""
    family = family_of(model.config.model_type)
    names = published_names(dict(model.named_parameters()), family)
    if not names:
        model.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size=max_shard_size)
        return {}
    try:
        state_dict = published_layout(model.state_dict(), family)
    except ValueError as err:
        raise ConfigError(f"cannot export {family.title} in the published layout: {err}") from None
    model.save_pretrained(
        str(out_dir),
        safe_serialization=True,
        max_shard_size=max_shard_size,
        state_dict=state_dict,
        save_original_format=False,
    )
    params = dict(model.named_parameters())
    return {name: weight_fingerprint(params[name]) for name in names}


def merge_adapter(model, inputs: dict, trained_logits: torch.Tensor, mask: torch.Tensor, atol: float):
    """(the adapter merged into the base weights, max |logit difference| to the adapter model), checked in memory in
    the training precision before any cast: a merge that changes the logits stops the export here."""
    with torch.no_grad():
        merged = model.merge_and_unload()
        diff = (merged(**inputs).logits.float().cpu() - trained_logits).abs()[mask].max().item()
    if diff > atol:
        raise RuntimeError(
            f"merging changed the logits by {diff:.2e} > {atol:.0e}: the adapter did not merge cleanly into the base "
            "weights"
        )
    return merged, diff


# QLoRA: how far the export may be from the trained model, in multiples of the 4-bit base's own error (below).
QUANTIZATION_ERROR_FACTOR = 2.0


def logits_without_adapter(model, inputs: dict) -> torch.Tensor:
    """The base model's logits under a PEFT model (the adapter switched off for one forward)."""
    with torch.no_grad(), model.disable_adapter():
        return model(**inputs).logits.float().cpu()


def merge_into_16_bit_base(config: Config, inputs: dict, trained: dict, mask: torch.Tensor, merge_atol: float):
    """QLoRA's export: the adapter merged into a freshly loaded 16-bit base, never into the 4-bit weights it trained on
    (merging into NF4 would round the update into 4 bits, and the export is a 16-bit model anyway). `trained` holds
    the logits of the trained model (`adapter`: the 4-bit base + adapter) and of its 4-bit base alone (`base`).
    Returns (merged model, the merge's in-memory difference, the quantization numbers of the report):
      - `base_error`: max |logits(4-bit base) - logits(16-bit base)|, the 4-bit model's own error on this batch;
      - `adapter_gap`: max |logits(4-bit base + adapter) - logits(16-bit base + adapter)|, what the export differs by
        from the trained model: the same quantization error, carried through layers the adapter changed, so of the
        size of `base_error` but not bounded by it (measured 0.9-1.4x on the tiny models with a strong adapter);
      - `atol`: the reload check's tolerance against the trained model, QUANTIZATION_ERROR_FACTOR x base_error on top
        of the dtype tolerance. The merge itself is checked exactly: in memory against the 16-bit base + adapter
        (`merge_atol`), and the reloaded export against the same (the 16-bit reload tolerance)."""
    from finetune.model.load import load_trained_model

    model, _ = load_trained_model(config, quantized=False)  # the 16-bit base + the trained adapter
    with torch.no_grad():
        adapter_16 = model(**inputs).logits.float().cpu()
    base_16 = logits_without_adapter(model, inputs)
    merged, merge_diff = merge_adapter(model, inputs, adapter_16, mask, merge_atol)
    numbers = {
        "type": config.model.quantization,
        "base_error": (trained["base"] - base_16).abs()[mask].max().item(),
        "adapter_gap": (trained["adapter"] - adapter_16).abs()[mask].max().item(),
        "factor": QUANTIZATION_ERROR_FACTOR,
    }
    return merged, merge_diff, numbers, adapter_16


def tolerances(config: Config, precision: str, export_dtype: str, logits: torch.Tensor) -> tuple[float, float]:
    """Max |logit difference| allowed (merge in memory, reload in the export dtype), both against the trained model.
    fp32 throughout: 1e-4. Half precision on either side: 5 % of the logit scale (bf16 keeps 8 bits of mantissa;
    measured 1.3 % on the tiny model), the merge itself being checked before the cast. `export.atol` sets both."""
    if config.export.atol is not None:
        return config.export.atol, config.export.atol
    half = 0.05 * max(1.0, logits.abs().max().item())
    return (1e-4 if precision == "fp32" else half), (1e-4 if precision == export_dtype == "fp32" else half)


def release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_readable(out_dir: Path) -> None:
    """0644 files and 0755 folders: safetensors are written 0600, unreadable for the rest of a shared cluster."""
    out_dir.chmod(0o755)
    for path in out_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def card_info(config: Config, run_dir: Path, export_dtype: str, served: dict) -> dict:
    run, info = RunDir(run_dir), RunDir(run_dir).run_info()
    return {
        "base_model": config.model.name_or_path,
        "dtype": export_dtype,
        "data": info.get("train_data", {}),
        "max_images": info.get("max_images_per_sample", 1),
        "max_videos": info.get("max_videos_per_sample", 1),
        "metrics": run.metrics(),
        "served_grids": served,
    }


def push_to_hub(out_dir: Path, repo_id: str, private: bool) -> None:
    """Upload the verified export (needs `huggingface-cli login` or HF_TOKEN; not exercised by the tests)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, repo_type="model")
    print(f"uploaded {out_dir} to https://huggingface.co/{repo_id}")


def export(config: Config) -> Path:
    from finetune.exporting.serving import apply_budgets, model_card, save_processor
    from finetune.model.load import DTYPES, inference_device_map, load_trained_model, position_rule, recipe_precision
    from finetune.model.tiny import resolve_model_path
    from finetune.recipe.data_settings import conversation_encoder

    run_dir, out_dir = Path(config.trainer.output_dir), Path(config.export.output_dir)
    trained_dir, lora = RunDir(run_dir).adapter, config.parts.uses_lora
    check_trained_dir(trained_dir, config)
    check_output_dir(out_dir, config.export.overwrite)
    if lora:
        check_adapter_base(trained_dir, resolve_model_path(config.model.name_or_path))
    precision = recipe_precision(config)
    export_dtype = precision if config.export.dtype == "auto" else config.export.dtype
    # base + adapter, or the fully trained model (no LoRA part), on the recipe's devices in `precision`
    model, processor = load_trained_model(config)
    encoder = conversation_encoder(processor, config, for_training=False)
    samples = reference_samples(config)
    batch = reference_batch(samples, encoder, position_rule(model, config.model))
    expected_grids = training_grids(samples, encoder)
    inputs = {k: v.to(model.device) for k, v in batch.items()}
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        trained_logits = model(**inputs).logits.float().cpu()
    merge_atol, reload_atol = tolerances(config, precision, export_dtype, trained_logits)
    quantization, reference_logits = None, trained_logits
    if config.model.quantization != "none":  # QLoRA: the trained model is the 4-bit base + adapter
        trained = {"adapter": trained_logits, "base": logits_without_adapter(model, inputs)}
        del model  # the 4-bit model goes before the 16-bit one loads (one GPU holds them one at a time)
        release_memory()
        merged, merge_diff, quantization, reference_logits = merge_into_16_bit_base(
            config, inputs, trained, mask, merge_atol
        )
        quantization["atol"] = reload_atol + QUANTIZATION_ERROR_FACTOR * quantization["base_error"]
    elif lora:
        merged, merge_diff = merge_adapter(model, inputs, trained_logits, mask, merge_atol)
    else:  # a run with no LoRA part trained the weights themselves: nothing to merge, its model is the export
        merged, merge_diff = model, None
    merged = merged.to(DTYPES[export_dtype])
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an earlier export (check_output_dir): no stale shard may survive
    out_dir.mkdir(parents=True)
    rewritten = save_published(merged, out_dir, config.export.max_shard_size)
    apply_budgets(processor, config.model)
    save_processor(processor, out_dir)
    (out_dir / "finetune_config.yaml").write_text(to_yaml(config))
    (out_dir / "README.md").write_text("(written after the reload check)\n")

    device_map = inference_device_map(config)
    merged_logits, served, (videos_checked, from_files, other_rate), reloaded = reload_check(
        out_dir, batch, expected_grids, DTYPES[export_dtype], device_map, list(rewritten)
    )
    max_diff = (merged_logits - trained_logits).abs()[mask].max().item()
    # against the trained model: within the 4-bit model's own error for QLoRA, else the dtype tolerance
    trained_atol = quantization["atol"] if quantization else reload_atol
    if quantization:  # and the merge exact: the export is the 16-bit base + adapter, to the dtype tolerance
        quantization["max_abs_logit_diff_16_bit"] = (merged_logits - reference_logits).abs()[mask].max().item()
        quantization["atol_16_bit"] = reload_atol
    quantization_ok = not quantization or quantization["max_abs_logit_diff_16_bit"] <= reload_atol
    mismatches = grid_mismatches(expected_grids, served)
    layout_problems = [
        f"{name}: merged {rewritten[name][0]}, reloaded {reloaded.get(name, [None])[0]}"
        for name in rewritten
        if reloaded.get(name) is None
        or reloaded[name][0] != rewritten[name][0]
        or abs(reloaded[name][1] - rewritten[name][1]) > 1e-6 * (1.0 + abs(rewritten[name][1]))
    ]
    report = {
        "merged_dir": str(out_dir.resolve()),
        "precision": precision,
        "dtype": export_dtype,
        # what was exported: LoRA merged into the base weights, or the fully trained weights (no merge: null)
        "trained": "lora-merged" if lora else "full",
        "parts": config.parts.modes(),
        "merge_max_abs_logit_diff": merge_diff,  # in memory, training precision
        "merge_atol": merge_atol if lora else None,
        "max_abs_logit_diff": max_diff,  # reloaded by plain transformers in `dtype`, against the trained model
        "atol": trained_atol,
        # QLoRA (null otherwise): the 4-bit base's own error, the export against the 16-bit base + adapter
        "quantization": quantization,
        "batch": {
            "samples": int(batch["input_ids"].shape[0]),
            "tokens": int(mask.sum()),
            "images": int(len(batch.get("image_grid_thw", []))),
            "videos": int(len(batch.get("video_grid_thw", []))),
        },
        "served_grids": {
            "checked": sum(len(v) for v in expected_grids.values()),
            "mismatches": mismatches,
            "videos": videos_checked,  # how: transformers decoded the files, or was given frames we decoded
            "video_input": None if videos_checked is None else ("file" if from_files else "frames"),
            # videos transformers' own loader reads at another frame rate (or frame count) than training and vLLM:
            # served with their frames and the trained metadata to render as trained (docs/fidelity.md)
            "other_frame_rate": other_rate,
        },
        # the tensors stored transposed or split per expert (the published layout): transformers' loader gave back
        # the merged weights
        "published_layout": {"rewritten": len(rewritten), "mismatches": layout_problems},
        "passed": max_diff <= trained_atol and quantization_ok and not mismatches and not layout_problems,
    }
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2))
    info = card_info(config, run_dir, export_dtype, report["served_grids"]) | {"quantization": quantization}
    (out_dir / "README.md").write_text(model_card(config, info))
    missing = missing_files(out_dir)
    make_readable(out_dir)
    if missing:
        raise RuntimeError(f"export to {out_dir} is missing {', '.join(missing)}")
    if max_diff > trained_atol:
        how = (
            f" ({QUANTIZATION_ERROR_FACTOR:g} x the 4-bit base's own error {quantization['base_error']:.2e} + "
            f"{reload_atol:.1e})"
            if quantization
            else ""
        )
        raise RuntimeError(
            f"the reloaded export's logits differ from the trained model's by {max_diff:.2e} > {trained_atol:.1e}{how}"
        )
    if not quantization_ok:
        raise RuntimeError(
            f"the reloaded export's logits differ from the 16-bit base + adapter's by "
            f"{quantization['max_abs_logit_diff_16_bit']:.2e} > {reload_atol:.1e}: the merge into the 16-bit base "
            "is not the adapter"
        )
    if layout_problems:
        raise RuntimeError(
            "plain transformers did not load the fused experts written in the published layout back as merged "
            "(not transposed back, or not fused again?):\n" + "\n".join(layout_problems)
        )
    if mismatches:
        raise RuntimeError("the exported processor does not reproduce the training grids:\n" + "\n".join(mismatches))
    qlora_note = (
        f" (QLoRA: merged into the 16-bit base, {quantization['max_abs_logit_diff_16_bit']:.2e} from the 16-bit "
        f"base + adapter; the 4-bit base's own error {quantization['base_error']:.2e})"
        if quantization
        else ""
    )
    print(
        f"exported {out_dir} ({export_dtype}) | reloaded with plain transformers | max |logit diff| {max_diff:.2e} "
        f"<= {trained_atol:.1e}{qlora_note} | served grids = training grids on {report['served_grids']['checked']} media files "
        + (f"(videos: {videos_checked})" if videos_checked else "(no videos)")
    )
    if config.export.push_to_hub:
        push_to_hub(out_dir, config.export.push_to_hub, config.export.hub_private)
    return out_dir


def main(argv: list[str]) -> None:
    export(load_config(argv))
