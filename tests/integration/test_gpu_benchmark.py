"""benchmarks/gpu_train.py: its table of published shapes, and a small-shape run of the whole benchmark on the CPU
(checkpoint built from the table, dataset from a seed, one training run per mode through accelerate, figures
read back from the run's own logs)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_train  # noqa: E402

# Parameter counts of the published checkpoints (billions; the Hub's safetensors totals: Qwen3-VL-8B-Instruct 8.77B,
# Qwen3-VL-30B-A3B-Instruct 31.1B) and the LLM matmul count for the 7B.
PUBLISHED = {
    "qwen2_vl_2b": 2.21,
    "qwen2_vl_7b": 8.29,
    "qwen2_5_vl_3b": 3.75,
    "qwen2_5_vl_7b": 8.29,
    "qwen2_5_vl_32b": 33.45,
    "qwen2_5_vl_72b": 73.41,
    "qwen3_vl_8b": 8.77,
    "qwen3_vl_moe_30b_a3b": 31.1,
}
# Activated per token (billions), the language model's: Qwen3-30B-A3B's published "3.3B activated" (of 30.5B).
ACTIVE_LLM = {"qwen3_vl_moe_30b_a3b": 3.3}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_shape_table_gives_the_published_parameter_counts(name):
    from transformers import AutoModelForImageTextToText

    config = gpu_train.model_config(name, None)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    count = sum(p.numel() for p in model.parameters()) / 1e9
    assert count == pytest.approx(PUBLISHED[name], rel=5e-3), count
    if name == "qwen2_5_vl_7b":
        assert gpu_train.llm_matmul_parameters(config.text_config.to_dict()) / 1e9 == pytest.approx(7.07, rel=1e-3)
    assert gpu_train.model_config(name, 4).text_config.num_hidden_layers == 4


@pytest.mark.parametrize("name", sorted(ACTIVE_LLM))
def test_the_moe_shapes_give_the_published_active_parameters(name):
    """A token goes through num_experts_per_tok of the experts: the language model's parameters less the others'
    are the published activated count, and the MFU's matmul count is those less the embeddings and norms."""
    from transformers import AutoModelForImageTextToText

    config = gpu_train.model_config(name, None)
    text = config.text_config
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    llm = {n: p.numel() for n, p in model.named_parameters() if not n.startswith("model.visual.")}
    unused = text.num_hidden_layers * (text.num_experts - text.num_experts_per_tok) * 3 * text.hidden_size
    active = sum(llm.values()) - unused * text.moe_intermediate_size
    assert active / 1e9 == pytest.approx(ACTIVE_LLM[name], abs=0.06), active
    not_matmul = sum(size for n, size in llm.items() if "norm" in n or "embed_tokens" in n)
    assert gpu_train.llm_matmul_parameters(text.to_dict()) == active - not_matmul


# Qwen3.5: shapes from transformers 5.23's config defaults (documented as the 9B and 35B-A3B styles); the published
# safetensors totals are not reachable here, so the names' sizes (billions) bound them.
NOMINAL = {"qwen3_5_9b": 9, "qwen3_5_moe_35b_a3b": 35}


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_the_hybrid_shapes_count_every_projection_of_each_layer_type(name):
    """Qwen3.5: three linear-attention layers to each full-attention one (also with --layers), a total of the name's
    size, and the MFU's matmul count equal to the language model's nn.Linear weights (dense: lm_head included) or, for
    the MoE, to its parameters a token goes through less the embeddings, norms, conv1d, A_log and dt_bias."""
    from transformers import AutoModelForImageTextToText

    config = gpu_train.model_config(name, None)
    text = config.text_config
    pattern = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
    assert text.layer_types == pattern * (text.num_hidden_layers // 4) and text.num_hidden_layers % 4 == 0
    assert gpu_train.model_config(name, 8).text_config.layer_types == text.layer_types[:8]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    count = sum(p.numel() for p in model.parameters()) / 1e9
    assert NOMINAL[name] <= count < NOMINAL[name] * 1.05, count
    matmul = gpu_train.llm_matmul_parameters(text.to_dict())
    llm = {n: p.numel() for n, p in model.named_parameters() if not n.startswith("model.visual.")}
    if not getattr(text, "num_experts", None):
        linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "visual" not in n]
        assert matmul == sum(m.weight.numel() for m in linear)
        return
    unused = text.num_hidden_layers * (text.num_experts - text.num_experts_per_tok) * 3 * text.hidden_size
    active = sum(llm.values()) - unused * text.moe_intermediate_size
    kinds = ("norm", "embed_tokens", "conv1d", "A_log", "dt_bias")
    not_matmul = sum(size for n, size in llm.items() if any(kind in n for kind in kinds))
    assert matmul == active - not_matmul


def test_the_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    command = [sys.executable, "benchmarks/gpu_train.py", "--model", "tiny_qwen2_5_vl", "--cpu", "--samples", "10"]
    command += ["--steps", "3", "--warmup", "1", "--workers", "0", "--out", str(tmp_path)]
    command += ["--modes", "packed,unpacked,grpo"]  # grpo at the CPU sizes: 2 prompts x 2 completions of 4 tokens
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_train.json").read_text())
    assert [row["mode"] for row in report["modes"]] == ["packed", "unpacked", "grpo"]
    *sft, grpo = report["modes"]
    # GRPO: rollout and the rest of the step both take time and add up to the step; a random model runs every
    # completion to the length limit
    assert (grpo["prompts_per_step"], grpo["generations"], grpo["max_completion_length"]) == (2, 2, 4)
    assert grpo["steps_measured"] == 2 and grpo["mean_completion_length"] == 4
    assert 0 < grpo["rollout_s"] < grpo["step_s"] and grpo["train_s"] > 0 and 0 < grpo["rollout_share"] < 1
    assert grpo["rollout_s"] + grpo["train_s"] == pytest.approx(grpo["step_s"], rel=1e-3)
    assert grpo["generated_tokens_per_second_per_gpu"] > 0 and grpo["trained_completion_tokens_per_second_per_gpu"] > 0
    assert "mfu" not in grpo
    prompts = json.loads(next(tmp_path.glob("data-*/prompts.json")).read_text())
    assert len(prompts) == 8 and all(p["solution"] in "ABCD" and ("images" in p) != ("videos" in p) for p in prompts)
    for row in sft:
        assert row["tokens_per_second_per_gpu"] > 0 and 0 < row["mfu"] < 1 and 0 <= row["data_wait_fraction"] <= 1
        assert row["steps_measured"] == 2 and "sdpa" in row["attention"]
    assert report["kernel_checks"] == {"per_sample/float32": "agrees with sdpa"}
    table = (tmp_path / "gpu_train.md").read_text()
    assert "| packed |" in table and "| unpacked |" in table and "MFU = tokens/s x 4 x" in table
    assert "| grpo | 2 x 2, 4 (max 4) |" in table
    records = json.loads(next(tmp_path.glob("data-*/train.json")).read_text())
    kinds = [("videos" in r) + 2 * ("images" in r) for r in records]
    assert (kinds.count(1), kinds.count(2), kinds.count(0)) == (4, 4, 2)  # 40 % video, 40 % image, 20 % text


def test_the_fsdp2_mode_launches_fsdp2_over_the_gpus_and_zero3_deepspeed(tmp_path):
    """--modes fsdp2 (no launch here: the suite's CPU run has one process, which FSDP2 refuses): on a machine with 4
    GPUs its run starts 4 processes under accelerate's FSDP2, with the model's units, as zero3 starts DeepSpeed."""
    from argparse import Namespace

    from finetune.model.tiny import tiny_checkpoint
    from finetune.recipe.load import load_config
    from finetune.runs.launch import accelerate_args

    args = Namespace(steps=3, workers=0, cpu=False, override=[])
    launches = {}
    for mode in ("fsdp2", "zero3"):
        overrides = gpu_train.mode_overrides(
            "tiny_qwen2_5_vl", mode, tiny_checkpoint("qwen2_5_vl"), tmp_path / "train.json", args, tmp_path, gpus=4
        )
        launches[mode] = accelerate_args(load_config(overrides), {}, 4, "bf16")
    fsdp2, zero3 = launches["fsdp2"], launches["zero3"]
    assert fsdp2[fsdp2.index("--num_processes") + 1] == "4" and "--use_deepspeed" not in fsdp2
    assert fsdp2[fsdp2.index("--fsdp_version") + 1] == "2" and "--use_fsdp" in fsdp2
    assert (
        fsdp2[fsdp2.index("--fsdp_transformer_layer_cls_to_wrap") + 1] == "Qwen2_5_VLDecoderLayer,Qwen2_5_VLVisionBlock"
    )
    assert "--use_deepspeed" in zero3 and "--use_fsdp" not in zero3


def test_the_sequence_parallel_search_reports_the_longest_row_each_n_trains(tmp_path):
    """--sequence-parallel 2,4 --row-tokens ...: per N, runs of growing rows split across N GPUs until the first
    failure; the longest that trained with its figures, and where and why it stopped (a run stands in for the GPUs)."""
    from argparse import Namespace

    from finetune.model.tiny import tiny_checkpoint
    from finetune.recipe.load import load_config

    args = Namespace(steps=3, workers=0, cpu=False, override=[], sequence_parallel="2,4", row_tokens="8192,16384,32768")
    overrides = gpu_train.mode_overrides(
        "tiny_qwen2_5_vl",
        "packed",
        tiny_checkpoint("qwen2_5_vl"),
        tmp_path / "train.json",
        args,
        tmp_path,
        gpus=4,
        extra=gpu_train.sequence_parallel_overrides(2, 16384),
    )
    config = load_config(overrides)
    assert (config.trainer.sequence_parallel, config.model.attn_implementation) == (2, "varlen")
    assert (config.trainer.max_tokens_per_row, config.data.max_length, config.trainer.packing) == (16384, 16384, True)

    fits = {2: 16384, 4: 32768}  # the longest row each N trains on these stand-in GPUs
    runs = []

    def run(name, mode, checkpoint, dataset, args, out, extra, label):
        n, tokens = int(extra[0].split("=")[1]), int(extra[2].split("=")[1])
        runs.append(label)
        if tokens > fits[n]:
            return {"mode": mode, "error": "exit 1: ...\ntorch.OutOfMemoryError: CUDA out of memory"}
        return {"mode": mode, "tokens_per_second_per_gpu": 1000.0 * n, "peak_memory_allocated_gib": tokens / 1024}

    rows = gpu_train.longest_rows("tiny_qwen2_5_vl", None, None, args, tmp_path, run=run)
    assert runs == ["sp2-8192", "sp2-16384", "sp2-32768", "sp4-8192", "sp4-16384", "sp4-32768"]
    assert [(r["sequence_parallel"], r["longest_row_tokens"]) for r in rows] == [(2, 16384), (4, 32768)]
    assert rows[0]["stopped_at_row_tokens"] == 32768 and "out of memory" in rows[0]["error"]
    assert "error" not in rows[1] and rows[1]["tokens_per_second_per_gpu"] == 4000.0
    table = gpu_train.markdown(
        {
            "model": "m",
            "layers": 2,
            "device": "GPU",
            "date": "d",
            "peak_flops": 1e12,
            "peak_measured_with": "x",
            "parameters_llm_matmul": 1e9,
            "kernel_checks": {},
            "modes": rows,
        }
    )
    assert "| 2 | 16,384 | 2,000 | 16.0 | 32,768: torch.OutOfMemoryError: CUDA out of memory |" in table
    assert "| 4 | 32,768 | 4,000 | 32.0 | - |" in table
