"""Export: merge the LoRA adapter into the base weights and prove the result loads and matches.

    python -m finetune.export [hydra overrides]       (the same overrides as the training run)

Writes `export.output_dir` (default `<run>/merged`): safetensors weights, config, generation config,
tokenizer, chat template and the image/video processor configs, i.e. everything `AutoProcessor` and
`AutoModelForImageTextToText` need. Then a fresh Python process that imports only torch and transformers
reloads it and computes logits on a real batch from the held-out (or training) split; they must match the
adapter model's logits within `export.atol`. The comparison is written to `export_report.json`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from finetune.cli import run
from finetune.config import Config, ConfigError, load_config
from finetune.paths import resolve_data_file

logger = logging.getLogger("finetune.export")
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "processor_config.json")  # fmt: skip

# Runs in a separate interpreter with no project code: what a user of the exported model has.
RELOAD_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor
model_dir, batch_file, out_file, dtype, device_map = sys.argv[1:6]
AutoProcessor.from_pretrained(model_dir)
model = AutoModelForImageTextToText.from_pretrained(
    model_dir, dtype=getattr(torch, dtype), device_map=None if device_map == "none" else device_map
).eval()
batch = {k: v.to(model.device) for k, v in load_file(batch_file).items()}
if "second_per_grid_ts" in batch:
    batch["second_per_grid_ts"] = batch["second_per_grid_ts"].tolist()
with torch.no_grad():
    logits = model(**batch).logits.float().cpu()
save_file({"logits": logits.contiguous()}, out_file)
"""


def reference_batch(config: Config, encoder, rule, max_samples: int = 4) -> dict:
    """A small real batch with images and videos when the data has both (the export must handle both), with the
    recipe's position ids: plain transformers is given the positions training used."""
    from finetune.batching import inference_batch
    from finetune.data.sources import parse_sources, read_source

    source = parse_sources(config.data.eval or config.data.train, config.data.media_root, resolve_data_file)[0]
    samples = read_source(source)[0][:64]
    with_video = [s for s in samples if s.media("video")][: max_samples // 2]
    chosen = with_video + [s for s in samples if s not in with_video][: max_samples - len(with_video)]
    batch = inference_batch([encoder.encode(s) for s in chosen], encoder.tokenizer.pad_token_id, rule)
    batch.pop("labels")
    return batch


def missing_files(out_dir: Path) -> list[str]:
    missing = [f for f in REQUIRED_FILES if not (out_dir / f).exists()]
    if not any(out_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if not ((out_dir / "chat_template.jinja").exists() or (out_dir / "chat_template.json").exists()):
        missing.append("chat_template.jinja")
    return missing


def _to(value, device):
    return value.to(device) if torch.is_tensor(value) else value


def reload_logits(out_dir: Path, batch: dict, dtype: torch.dtype, device_map: str | None) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        batch_file, logits_file = Path(tmp) / "batch.safetensors", Path(tmp) / "logits.safetensors"
        tensors = {k: (torch.tensor(v) if isinstance(v, list) else v).contiguous() for k, v in batch.items()}
        save_file(tensors, str(batch_file))
        dtype_name = str(dtype).removeprefix("torch.")
        cmd = [sys.executable, "-c", RELOAD_SCRIPT, str(out_dir), str(batch_file), str(logits_file), dtype_name,
               device_map or "none"]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"plain transformers could not load {out_dir}:\n{result.stderr[-3000:]}")
        return load_file(str(logits_file))["logits"]


def export(config: Config) -> Path:
    from peft import PeftModel

    from finetune.data.encode import ConversationEncoder
    from finetune.modeling import (
        DTYPES,
        inference_device_map,
        load_model,
        load_processor,
        position_rule,
        resolve_precision,
        uses_gpu,
    )

    run_dir = Path(config.trainer.output_dir)
    adapter_dir, out_dir = run_dir / "adapter", Path(config.export.output_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ConfigError(f"No LoRA adapter at {adapter_dir}; train first (./launch.sh with the same overrides).")
    precision = resolve_precision(config.trainer.precision, uses_gpu(config))
    processor = load_processor(config.model, path=str(adapter_dir))
    base = load_model(config.model, precision, device_map=inference_device_map(config))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    encoder = ConversationEncoder.from_recipe(processor, config, for_training=False)
    batch = reference_batch(config, encoder, position_rule(base, config.model))
    with torch.no_grad():
        adapter_logits = model(**{k: _to(v, model.device) for k, v in batch.items()}).logits.float().cpu()

    merged = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    missing = missing_files(out_dir)
    if missing:
        raise RuntimeError(f"export to {out_dir} is missing {', '.join(missing)}")

    merged_logits = reload_logits(out_dir, batch, DTYPES[precision], inference_device_map(config))
    mask = batch["attention_mask"].bool()
    max_diff = (merged_logits - adapter_logits).abs()[mask].max().item()
    atol = config.export.atol if config.export.atol is not None else (1e-4 if precision == "fp32" else 5e-2)
    report = {
        "merged_dir": str(out_dir.resolve()),
        "precision": precision,
        "max_abs_logit_diff": max_diff,
        "atol": atol,
        "batch": {"samples": int(batch["input_ids"].shape[0]), "tokens": int(mask.sum()),
                  "images": int(len(batch.get("image_grid_thw", []))),
                  "videos": int(len(batch.get("video_grid_thw", [])))},  # fmt: skip
        "passed": max_diff <= atol,
    }
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        raise RuntimeError(f"merged model logits differ from the adapter model by {max_diff:.2e} > atol {atol:.0e}")
    print(f"exported {out_dir} | reloaded with plain transformers | max |logit diff| {max_diff:.2e} <= {atol:.0e}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    return run(lambda: export(load_config(overrides)))

if __name__ == "__main__":
    sys.exit(main())
