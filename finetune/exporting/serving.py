"""What an exported model carries so that whoever serves it feeds it what it was trained on.

- The processor configs hold the recipe's budgets: images `size` = {min_pixels, max_pixels}; videos sampled
  by the processor itself (`do_sample_frames`) at `video_fps` within [min_frames, max_frames], frames within
  {video_min_pixels, video_max_pixels}, each capped by the share of the total pixel budget
  (`cap_pixels_per_frame`, `max_video_tokens`). The legacy `preprocessor_config.json` and
  `video_preprocessor_config.json` (with `min_pixels`/`max_pixels` keys) go next to `processor_config.json`
  for tools that read those.
- `SERVING_DIFFERENCES`: what transformers' video processor cannot express of qwen-vl-utils' rules (measured
  by tests/unit/exporting/test_serving.py), repeated in the model card.
- `model_card`: README.md of the export: base model, recipe, data, evaluation, how to load, how to serve
  (vLLM `mm_processor_kwargs` / `limit_mm_per_prompt` with the same budgets).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from finetune.base.families import FAMILIES
from finetune.data.vision import FACTOR, FRAME_FACTOR

TOKEN_PIXELS = FACTOR * FACTOR * 0.9  # transformers: total video pixels = int(max_video_tokens * 28 * 28 * 0.9)

SERVING_DIFFERENCES = """\
- Which frames: transformers' video processor samples `arange(0, total, total / n)` (frames 0, 15, 30, ...),
  qwen-vl-utils and this training `linspace(0, total - 1, n).round()` (0, 16, 32, ..., the last frame). Same
  count, grid and `second_per_grid_ts`; the frames can differ by up to total / n - 1 source frames. To feed
  exactly the trained frames, sample them yourself (qwen-vl-utils `fetch_video`) and call the processor with
  `do_sample_frames=False` and `video_metadata` holding the fps and the frame indices.
- Per-sample options (`nframes`, `video_start`/`video_end`, per-item `max_pixels`, `fps`) are per request:
  pass them in the processor call (`videos_kwargs`) or in vLLM's `mm_processor_kwargs`.
- Frame counts (Qwen3-VL): Qwen3VLVideoProcessor samples int(frames / fps x the recipe's fps) frames and pads an
  odd count with a copy of the last frame; qwen-vl-utils and this training floor the count to whole pairs. A clip
  whose count comes out odd is served one frame pair longer than it was trained (its last pair repeats a frame);
  feed the trained frames as above (`do_sample_frames=False` with the metadata) to get the trained grid.
- Small frames (Qwen3-VL): training scales each frame up to `video_min_pixels` (qwen-vl-utils); Qwen3VLVideoProcessor
  holds the whole clip (frames x height x width) to `size.shortest_edge`, so a clip of frames smaller than that is
  served at its own, smaller size. Feed frames already resized to the trained size to serve what was trained.
- Frame rate: training reads a video's frame rate from its container (FFmpeg's average rate), as vLLM's default
  video loader does (OpenCV); transformers' own loader and qwen-vl-utils read torchcodec's `average_fps` (frames over
  the decoded timestamps' span), which differs for variable-rate files, some files with B-frames and Matroska/WebM
  (millisecond timestamps). Given such a file, transformers writes other Qwen3-VL timestamps (`<x.x seconds>`) and
  Qwen2.5-VL `second_per_grid_ts` (and may sample another frame count). Serve with vLLM's default loader, or give
  transformers the frames plus `video_metadata` with the container's rate (`fps`, `total_num_frames`,
  `frames_indices`) and `do_sample_frames=False`. The export lists the checked videos this concerns.
- Frame folders and frame lists are a training input only; serve the video file.
- The total video pixel budget is expressed as `max_video_tokens` (transformers computes
  `int(max_video_tokens * 28 * 28 * 0.9)` pixels). Qwen's default (128000 tokens) and any multiple of 3528
  pixels are exact; another budget is rounded to the nearest expressible one, which changed the frame size of
  5 in 4,000 random (frame size, frame count) cases for a budget of 1024 * 28 * 28 (tests/unit/exporting/test_serving.py).
- Resizing: the same sizes; pixel values can differ in the last bit (both resize bicubic with antialiasing,
  transformers on float frames, training on uint8 frames as qwen-vl-utils does)."""


def max_video_tokens(total_pixels: float) -> int:
    """The `max_video_tokens` whose pixel budget in transformers is closest to `total_pixels`."""
    return max(1, round(total_pixels / TOKEN_PIXELS))


def apply_budgets(processor, model_cfg) -> None:
    """Set the recipe's image and video budgets on a loaded processor (in place) so that saving it exports them, in
    the terms of the family's video processor (`video_budget`, finetune/base/families.py)."""
    image, video = processor.image_processor, processor.video_processor
    image.size = {"shortest_edge": model_cfg.min_pixels, "longest_edge": model_cfg.max_pixels}
    video.do_sample_frames = True
    video.fps = float(model_cfg.video_fps)
    video.min_frames = math.ceil(model_cfg.video_min_frames / FRAME_FACTOR) * FRAME_FACTOR  # as qwen-vl-utils rounds it
    video.max_frames = model_cfg.video_max_frames
    video.cap_pixels_per_frame = True
    if FAMILIES[model_cfg.family].video_budget == "clip":
        # Qwen3VLVideoProcessor: each frame gets max(min(max_video_tokens * factor^2, longest_edge / frames),
        # 1.05 * shortest_edge) pixels; qwen-vl-utils gives a frame min(video_max_pixels, total * 2 / frames) (it
        # counts the total per frame pair), floored the same way: longest_edge = 2 x the recipe's total.
        factor = video.patch_size * video.merge_size
        video.size = {
            "shortest_edge": model_cfg.video_min_pixels,
            "longest_edge": int(model_cfg.video_total_pixels * FRAME_FACTOR),
        }
        video.max_video_tokens = model_cfg.video_max_pixels // factor**2
    else:
        video.size = {"shortest_edge": model_cfg.video_min_pixels, "longest_edge": model_cfg.video_max_pixels}
        video.max_video_tokens = max_video_tokens(model_cfg.video_total_pixels)


def save_processor(processor, out_dir: Path) -> None:
    """processor_config.json (transformers 5), plus the legacy per-processor files with min/max_pixels keys."""
    processor.save_pretrained(str(out_dir))
    processor.image_processor.save_pretrained(str(out_dir))
    processor.video_processor.save_pretrained(str(out_dir))
    processor_class = type(processor).__name__
    for name, part in (
        ("preprocessor_config.json", processor.image_processor),
        ("video_preprocessor_config.json", processor.video_processor),
    ):
        path = out_dir / name
        data = json.loads(path.read_text())
        data.update(
            min_pixels=part.size["shortest_edge"], max_pixels=part.size["longest_edge"], processor_class=processor_class
        )
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def vllm_settings(model_cfg, max_images: int, max_videos: int) -> dict:
    """vLLM arguments for the trained budgets. vLLM runs the HF processor of the model folder, which already holds
    every budget; `mm_processor_kwargs` only repeats the frame rate. `min_pixels`/`max_pixels` are deliberately not
    passed there: transformers hands a call-level key to the image *and* the video processor, which would give video
    frames the image budget."""
    return {
        "limit_mm_per_prompt": {"image": max(max_images, 1), "video": max(max_videos, 1)},
        "mm_processor_kwargs": {"fps": float(model_cfg.video_fps)},
    }


def _metrics_table(metrics: dict | None) -> str:
    if not metrics:
        return "No held-out evaluation was run for this export."
    if "reward" in metrics:  # an RL method: one greedy completion per held-out prompt, scored by the rewards
        rows = ["| reward | n | mean | not scored |", "|---|---|---|---|"]
        for name, r in metrics["rewards"].items():
            mean = "-" if r["mean"] is None else f"{r['mean']:.3f}"
            rows.append(f"| {name} | {r['scored'] + r['no_score']} | {mean} | {r['no_score']} |")
        rows.append(f"| weighted total | {metrics['n']} | {metrics['reward']:.3f} | |")
        return "\n".join(rows)
    rows = ["| task | n | exact match | chance |", "|---|---|---|---|"]
    for name, t in metrics["tasks"].items():
        rows.append(f"| {name} | {t['n']} | {t['accuracy']:.3f} | {t['chance']:.3f} |")
    rows.append(f"| overall | {metrics['n']} | {metrics['accuracy']:.3f} | {metrics['chance']:.3f} |")
    return "\n".join(rows)


def _qlora_note(config, info: dict) -> str:
    """What a QLoRA run's export is: the adapter trained on the 4-bit base, merged into the 16-bit base."""
    if config.model.quantization == "none":
        return ""
    q = info.get("quantization") or {}
    numbers = (
        f" On the export's check batch the 4-bit base's logits were {q['base_error']:.2e} (max) from the 16-bit "
        f"base's, and this model's {q['adapter_gap']:.2e} from the trained 4-bit model's."
        if q
        else ""
    )
    moe = FAMILIES[config.model.family].expert_lora_targets
    return (
        f"\n\nTrained as QLoRA (`model.quantization={config.model.quantization}`): the LLM's linear layers were 4-bit "
        "NF4 (bitsandbytes, double quantization) under the adapter; the vision tower, mergers and lm_head"
        + (", and the fused MoE experts (not nn.Linear: bitsandbytes cannot quantize them)," if moe else "")
        + " were not quantized. The adapter was merged into the unquantized base weights (not the 4-bit ones): this "
        "model is the base + the adapter, which differs from the model that trained by the 4-bit quantization error."
        + numbers
    )


def model_card(config, info: dict) -> str:
    """README.md of the export. `info`: base, data (file -> samples), metrics, max media per sample, report."""
    m = config.model
    settings = vllm_settings(m, info.get("max_images", 1), info.get("max_videos", 1))
    data = "\n".join(f"- `{name}`: {count} samples" for name, count in info.get("data", {}).items())
    data = data or "- (not recorded)"
    served = info.get("served_grids") or {}
    grid_line = (
        f"Checked at export: plain transformers on this folder gave the training grids for "
        f"{served.get('checked', 0)} media files ({len(served.get('mismatches', []))} mismatches)"
        + (f"; videos: {served['videos']}." if served.get("videos") else ".")
        if served
        else ""
    )
    other_rate = served.get("other_frame_rate") or []
    if other_rate:
        listed = "; ".join(
            f"`{Path(d['path']).name}` ({d['trained_fps']:.6g} fps, {d['trained_frames']} frames trained; "
            f"{d['transformers_fps']:.6g} fps, {d['transformers_frames']} frames read by transformers)"
            for d in other_rate
        )
        grid_line += (
            f" {len(other_rate)} checked videos render differently when transformers reads the file itself (another "
            f"frame rate: see Known differences, Frame rate): {listed}. vLLM's default loader reads them as trained; "
            "with transformers, pass their frames and `video_metadata` with the trained rate."
        )
    limit, kwargs = json.dumps(settings["limit_mm_per_prompt"]), json.dumps(settings["mm_processor_kwargs"])
    rule_note = (
        "vLLM and SGLang use the same M-RoPE rule as training (`qwen`: text after an image or video "
        "resumes at the largest position + 1)."
        if m.rope_rule == "qwen"
        else "WARNING: trained with `model.rope_rule=transformers`; vLLM and SGLang use the `qwen` rule, so "
        "video answers can differ from what was trained. Serve with transformers' own `generate`."
    )
    return f"""---
base_model: {info.get("base_model", m.name_or_path)}
library_name: transformers
pipeline_tag: image-text-to-text
tags: [{m.family}, qwen-vl-finetune, {"lora-merged" if config.parts.uses_lora else "full-finetune"}, {config.method.name}]
---

# {config.name}

`{info.get("base_model", m.name_or_path)}` fine-tuned with qwen-vl-finetune (method `{config.method.name}`, recipe `{config.name}`,
{"LoRA r=" + str(config.peft.r) + " merged into the weights" if config.parts.uses_lora else "full fine-tuning"}),
exported in {info.get("dtype", "?")}. The full resolved recipe is `finetune_config.yaml`.{_qlora_note(config, info)}

## Training data

{data}

## Evaluation (held-out, greedy decoding)

{_metrics_table(info.get("metrics"))}

## Inputs the model was trained on

- Images: {m.min_pixels:,} to {m.max_pixels:,} pixels each (`smart_resize`, multiples of 28).
- Videos: sampled at {m.video_fps:g} fps in pairs of frames, {m.video_min_frames} to {m.video_max_frames} frames;
  {m.video_min_pixels:,} to {m.video_max_pixels:,} pixels per frame, within a total of {m.video_total_pixels:,.0f}
  pixels per video.
- M-RoPE positions: rule `{m.rope_rule}`.

These budgets are in `processor_config.json` (and the legacy `preprocessor_config.json` /
`video_preprocessor_config.json`), so `AutoProcessor.from_pretrained` on this folder applies them. {grid_line}

## Load with transformers

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("PATH", dtype="auto", device_map="auto")
processor = AutoProcessor.from_pretrained("PATH")
inputs = processor.apply_chat_template(
    [{{"role": "user", "content": [{{"type": "video", "path": "clip.mp4"}},
                                  {{"type": "text", "text": "What happens?"}}]}}],
    add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt").to(model.device)
print(processor.batch_decode(model.generate(**inputs, max_new_tokens=64)[:, inputs["input_ids"].shape[1]:],
                             skip_special_tokens=True)[0])
```

transformers >= 5.3 computes M-RoPE positions with its own rule, which differs from the trained one after
videos longer than they are wide. To generate with the trained rule, add (from qwen-vl-finetune):
`from finetune.model.rope import PositionRule, install_position_rule;
install_position_rule(model, PositionRule.for_model(model.config, "{m.rope_rule}"))`.

## Serve with vLLM

{rule_note}

```bash
vllm serve PATH --limit-mm-per-prompt '{limit}' --mm-processor-kwargs '{kwargs}'
```

```python
from vllm import LLM
llm = LLM("PATH", limit_mm_per_prompt={settings["limit_mm_per_prompt"]},
          mm_processor_kwargs={settings["mm_processor_kwargs"]})
```

(`limit_mm_per_prompt` is the most images / videos one training sample held. The pixel budgets come from this
folder's processor config; do not pass `min_pixels`/`max_pixels` in `mm_processor_kwargs`: transformers would
apply them to video frames too. Not run here: no vLLM on the machine that exported this model.)

## Known differences from the training pipeline

{SERVING_DIFFERENCES}
"""
