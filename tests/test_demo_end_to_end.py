"""The demo as a user runs it (`./launch.sh` execs `python -m finetune.launch`): train -> evaluate -> export,
for both model families; the held-out accuracy must clear 80 % where chance is 25 %, and the merged model,
loaded by plain transformers with the trained position rule installed (README, Positions), must answer
held-out video questions exactly as our evaluation did."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.helpers import DEMO
from tests.helpers.recipe_runs import run_module


def ask_about_videos(model_dir, records):
    """transformers' own processor (with the budgets the export carries) and generate; the only project code is the
    README's one line that makes generate use the trained M-RoPE rule (transformers >= 5.3 has another one; vLLM
    and SGLang need nothing)."""
    from finetune.rope import PositionRule, install_position_rule

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    install_position_rule(model, PositionRule.for_model(model.config, "qwen"))
    answers = []
    for record in records:
        question = record["messages"][0]["content"].replace("<video>", "")
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], videos=[str(DEMO / record["videos"][0])], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answers.append(
            processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
        )
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("experiment,logger", [("demo", "wandb"), ("demo_qwen2_vl", "tensorboard")])
def test_demo_end_to_end(tmp_path, experiment, logger):
    run_dir = tmp_path / experiment
    result = run_module(
        "finetune.launch",
        [f"experiment={experiment}", f"logger={logger}", f"trainer.output_dir={run_dir}"],
        timeout=900,
    )
    assert "accelerate.commands.launch --num_processes 1 --num_machines 1" in result.stdout and "--cpu" in result.stdout
    assert "Run directory:" in result.stdout

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    print(experiment, json.dumps(metrics))
    assert metrics["n"] == 200 and metrics["chance"] <= 0.25
    assert metrics["accuracy"] >= 0.80
    assert all(task["accuracy"] >= 0.70 for task in metrics["tasks"].values())

    report = json.loads((run_dir / "merged" / "export_report.json").read_text())
    assert report["passed"] and report["max_abs_logit_diff"] <= 1e-4
    logs = (
        list((run_dir / "wandb").glob("offline-run-*"))
        if logger == "wandb"
        else list(run_dir.rglob("events.out.tfevents.*"))
    )
    assert logs, f"no {logger} logs written"

    records = [r for r in json.loads((DEMO / "test.json").read_text()) if r["task"] == "direction"][:8]
    answers = ask_about_videos(run_dir / "merged", records)
    correct = sum(a == r["messages"][-1]["content"] for a, r in zip(answers, records))
    assert correct >= 6, list(zip(answers, [r["messages"][-1]["content"] for r in records]))
    predictions = {
        p["id"]: p["prediction"].strip() for p in map(json.loads, open(run_dir / "eval" / "predictions.jsonl"))
    }
    assert answers == [predictions[r["id"]] for r in records]  # served = evaluated: same pixels, positions, tokens
