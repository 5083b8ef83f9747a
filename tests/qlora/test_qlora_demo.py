"""QLoRA end to end on the demo recipe (the tiny Qwen2.5-VL), in this process: 20 steps with model.quantization=nf4
whose loss falls, then the real export: the adapter merged into a freshly loaded 16-bit base, reloaded by plain
transformers in a fresh interpreter, equal to the 16-bit base + adapter and within the stated tolerance of the trained
4-bit model. One run for the path; what differs per family is tested per family in test_quantization.py.
"""

import json
from statistics import mean

import pytest
from safetensors import safe_open

STEPS = 20


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    from finetune.cli.main import run_command

    run_dir = tmp_path_factory.mktemp("qlora") / "demo"
    overrides = [
        "experiment=demo",
        "model.quantization=nf4",
        f"trainer.max_steps={STEPS}",
        "trainer.per_device_train_batch_size=8",
        "trainer.warmup_steps=0",
        "trainer.logging_steps=1",
        "logger=none",
        f"trainer.output_dir={run_dir}",
    ]
    assert run_command("train", overrides) == 0
    assert run_command("export", overrides) == 0
    return run_dir


def test_the_demo_loss_falls_over_20_qlora_steps(qlora_run):
    history = json.loads((qlora_run / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == STEPS
    assert mean(losses[-5:]) < 0.8 * mean(losses[:5]), losses  # measured: 5.5 -> 3.2


def test_the_export_is_the_16_bit_merge_within_the_4_bit_models_own_error(qlora_run):
    merged = qlora_run / "merged"
    report = json.loads((merged / "export_report.json").read_text())
    q = report["quantization"]
    assert report["passed"] and q["type"] == "nf4" and report["served_grids"]["mismatches"] == []
    # exact against the 16-bit base + adapter (fp32 on the CPU: 1e-4) ...
    assert q["atol_16_bit"] == 1e-4 and q["max_abs_logit_diff_16_bit"] <= q["atol_16_bit"]
    # ... and within twice the 4-bit base's own error (which is real: not a vacuous bound) of the trained model
    assert q["base_error"] > 1e-3 and report["atol"] == pytest.approx(q["atol_16_bit"] + 2 * q["base_error"])
    assert report["max_abs_logit_diff"] == pytest.approx(q["adapter_gap"], rel=1e-3)
    assert report["max_abs_logit_diff"] <= report["atol"]
    # a plain unquantized checkpoint: no quantization config, no 4-bit tensors
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    for shard in merged.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F32"}, shard
    assert "Trained as QLoRA (`model.quantization=nf4`)" in (merged / "README.md").read_text()
