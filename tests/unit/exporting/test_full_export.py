"""A run with no LoRA part (`parts.llm=full`) is exported like a LoRA run: the fully trained weights in the published
layout, reloaded by plain transformers with the trained model's logits, the processor with the recipe's budgets, the
model card; and evaluate / predict ask the run as trained. Two training steps of the tiny demo, in this process."""

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.cli.main import run_command
from finetune.evaluation.predict import find_model
from finetune.exporting.export import check_trained_dir
from finetune.exporting.serving import max_video_tokens
from finetune.model.trainable import model_part
from finetune.recipe.load import load_config
from tests.helpers import DEMO
from tests.helpers.recipe_runs import mini_dataset, tiny_run_overrides


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """(overrides, run directory, training file) of the demo recipe with parts.llm=full, trained 2 steps and exported
    by the default recipe (export.after_training is no longer refused for it)."""
    root = tmp_path_factory.mktemp("full")
    train_file = mini_dataset(root / "train.json", per_task=2)
    overrides = tiny_run_overrides("qwen2_5_vl", root / "run", train_file, steps=2) + [
        "parts.llm=full",
        "trainer.save_steps=1000",
    ]
    for command in ("train", "export"):
        assert run_command(command, overrides) == 0
    return overrides, root / "run", train_file


def test_the_export_of_a_full_fine_tune_is_checked_budgeted_and_described(full_run, tiny_paths):
    from transformers import AutoProcessor

    overrides, run_dir, train_file = full_run
    config, merged = load_config(overrides), run_dir / "merged"
    report = json.loads((merged / "export_report.json").read_text())
    # the reload check's figures: plain transformers on the folder gives the trained model's logits and grids
    assert report["trained"] == "full" and report["parts"]["llm"] == "full" and report["passed"]
    assert report["merge_max_abs_logit_diff"] is None  # nothing merged
    assert report["atol"] == 1e-4 and 0 <= report["max_abs_logit_diff"] <= report["atol"]
    assert report["batch"]["images"] > 0 and report["batch"]["videos"] > 0 and report["batch"]["tokens"] > 0
    assert report["served_grids"]["checked"] >= 2 and report["served_grids"]["mismatches"] == []

    # the trained weights, in the base checkpoint's keys: the LLM moved, the frozen vision side did not
    exported, trained = (
        load_file(str(merged / "model.safetensors")),
        load_file(str(run_dir / "adapter" / "model.safetensors")),
    )
    base = load_file(f"{tiny_paths['qwen2_5_vl']}/model.safetensors")
    assert exported.keys() == base.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in exported)
    moved = {model_part(k, FAMILIES["qwen2_5_vl"]) for k in base if not torch.equal(exported[k], base[k])}
    assert moved == {"llm"}

    # the exported processor holds the recipe's budgets
    m = config.model
    processor = AutoProcessor.from_pretrained(merged)
    image, video = processor.image_processor, processor.video_processor
    assert image.size == {"shortest_edge": m.min_pixels, "longest_edge": m.max_pixels}
    assert video.size == {"shortest_edge": m.video_min_pixels, "longest_edge": m.video_max_pixels}
    assert video.do_sample_frames and video.fps == m.video_fps and video.max_frames == m.video_max_frames
    assert video.max_video_tokens == max_video_tokens(m.video_total_pixels)
    saved = json.loads((merged / "preprocessor_config.json").read_text())
    assert (saved["min_pixels"], saved["max_pixels"]) == (m.min_pixels, m.max_pixels)

    # the model card names what was trained and the budgets
    card = (merged / "README.md").read_text()
    assert "full fine-tuning" in card and "full-finetune" in card and "lora" not in card.split("---")[1]
    assert f"{m.min_pixels:,} to {m.max_pixels:,} pixels" in card
    assert f"{m.video_min_pixels:,} to {m.video_max_pixels:,} pixels per frame" in card
    assert "vllm serve" in card and str(train_file) in card


def test_evaluate_and_predict_ask_a_full_fine_tune_as_trained(full_run, capsys):
    """evaluate loads the run's fully trained model; predict gives evaluation's answer from the run, its adapter/
    folder (recognised as the run's, so asked with the recipe's budgets) and the export."""
    overrides, run_dir, train_file = full_run
    assert run_command("evaluate", overrides) == 0
    predictions = [json.loads(line) for line in open(run_dir / "eval" / "predictions.jsonl")]
    expected = next(p for p in predictions if p["task"] == "colour")
    record = next(r for r in json.loads(train_file.read_text()) if r["id"] == expected["id"])
    question = record["messages"][0]["content"].replace("<image>", "")
    for model in (run_dir / "adapter", run_dir / "merged"):
        capsys.readouterr()
        args = ["--model", str(model), "--image", str(DEMO / record["images"][0]), "--question", question]
        assert run_command("predict", [*args, "--max-new-tokens", "4"]) == 0
        captured = capsys.readouterr()
        assert captured.out.strip() == expected["prediction"], model
    recipe, model_dir = find_model(str(run_dir / "adapter"))  # the run's recipe, not Qwen's default budgets
    assert model_dir is None and recipe.trainer.output_dir == str(run_dir) and recipe.parts.llm == "full"


def test_the_launcher_exports_a_run_with_no_lora_part():
    from finetune.runs.launch import commands

    config = load_config(["parts.llm=frozen", "parts.vision_tower=full", "parts.merger=full"])
    assert config.export.after_training
    steps = commands(config, [], [])
    assert any("finetune.export" in step for step in steps)


def test_the_run_directory_must_hold_what_the_recipe_trains(tmp_path):
    """An adapter exported with a no-LoRA recipe (or a full model with a LoRA recipe) is refused with the fix."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    full, lora = load_config(["parts.llm=full"]), load_config([])
    with pytest.raises(ConfigError, match=r"No trained model \(parts.llm=full .*\) at .*; train first"):
        check_trained_dir(folder, full)
    (folder / "config.json").write_text("{}")
    check_trained_dir(folder, full)
    with pytest.raises(ConfigError, match=r"holds a fully trained model, but the recipe trains LoRA .*parts.llm=full"):
        check_trained_dir(folder, lora)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "config.json").unlink()
    check_trained_dir(folder, lora)
    with pytest.raises(ConfigError, match=r"holds a LoRA adapter, but the recipe trains no part with LoRA"):
        check_trained_dir(folder, full)
