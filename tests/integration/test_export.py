"""Export round trip: merged weights + every processor file, reloaded by plain transformers, same logits."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from finetune.base.families import FAMILIES
from finetune.exporting.videos import transformers_decodes_video_files
from finetune.recipe.data_settings import vision_settings
from tests.helpers import DEMO
from tests.helpers.recipe_runs import mini_dataset, run_module, tiny_run_overrides


def held_out_video_inputs(processor):
    """The processor's defaults only: the export carries the recipe's budgets (56 x 56 frames at 4 fps here)."""
    record = next(r for r in json.loads((DEMO / "test.json").read_text()) if r["task"] == "direction")
    question = record["messages"][0]["content"].replace("<video>", "")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], videos=[str(DEMO / record["videos"][0])], return_tensors="pt")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A family's demo recipe trained 5 steps on 4 images and 4 videos, evaluated and exported: once per family for
    the tests of this module that read the export (run_dir, train_file, overrides)."""
    runs = {}

    def run(family):
        if family not in runs:
            root = tmp_path_factory.mktemp(f"export-{family}")
            train_file = mini_dataset(root / "train.json")
            overrides = tiny_run_overrides(family, root / "run", train_file, steps=5)
            run_in_process(overrides)
            runs[family] = root / "run", train_file, overrides
        return runs[family]

    return run


# Qwen2-VL's export is made and checked end to end by its demo (tests/integration/test_demo_end_to_end.py: the
# report's reload and merge checks, the served grids, plain transformers answering as our evaluation did); the files,
# permissions and card checked here do not depend on the family (Qwen2.5-VL shares its path).
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2_vl"])
def test_export_round_trip(tmp_path, exported, family):
    from peft import PeftModel

    run_dir, train_file, overrides = exported(family)
    merged = run_dir / "merged"
    report = json.loads((merged / "export_report.json").read_text())
    assert report["passed"] and report["max_abs_logit_diff"] <= 1e-4 and report["merge_max_abs_logit_diff"] <= 1e-4
    assert report["batch"]["images"] > 0 and report["batch"]["videos"] > 0
    assert report["served_grids"]["checked"] >= 4 and report["served_grids"]["mismatches"] == []
    # Which way the video grids were checked (the other way: tests/unit/data/test_no_torchcodec.py).
    assert report["served_grids"]["video_input"] == ("file" if transformers_decodes_video_files() else "frames")
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "finetune_config.yaml",
        "README.md",
    ):
        assert (merged / name).exists(), name
    assert not list(merged.glob("*.bin")) and not (merged / "adapter_config.json").exists()
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in merged.iterdir()), "export files must be readable by all"
    card = (merged / "README.md").read_text()
    assert "vllm serve" in card and "limit-mm-per-prompt" in card and str(train_file) in card and "8 samples" in card
    assert_served_grids_are_trained_grids(merged, overrides, tmp_path / "media")

    # A user with only transformers: load, ask a held-out video question, get the adapter model's answer.
    processor = AutoProcessor.from_pretrained(merged)
    model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    inputs = held_out_video_inputs(processor)
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 4]]  # 8 frames of 56 x 56, as trained
    base = AutoModelForImageTextToText.from_pretrained(report_base_path(run_dir))
    adapter_model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        merged_logits, adapter_logits = model(**inputs).logits, adapter_model(**inputs).logits
        merged_answer = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        adapter_answer = adapter_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert (merged_logits - adapter_logits).abs().max().item() <= 1e-4
    assert merged_answer.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(merged_answer, adapter_answer)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.startswith("qwen3")])  # vLLM's qwen3_vl*/qwen3_5.py
def test_the_export_is_in_the_layout_vllm_loads(exported, family):
    """5 steps of LoRA (MoE: on attention and every expert), then the export: every key maps onto a module of vLLM
    0.33.0's Qwen3-VL or Qwen3.5 loaders (mappers read from its source, tests/helpers/vllm_weights.py), tied
    embeddings leave lm_head.weight out, and the experts are stored as the published checkpoints store them (Qwen3-VL-
    MoE: fused and transposed; Qwen3.5-MoE: one tensor per expert and projection): computed the way vLLM loads them,
    they give the reloaded transformers model's expert outputs. The frozen router is exported as it was."""
    from safetensors.torch import load_file

    from finetune.model.checkpoint_layout import split_per_expert
    from tests.helpers.vllm_weights import (
        tied_in_vllm,
        unknown_modules,
        vllm_expert_output,
        vllm_name,
        vllm_per_expert_output,
    )

    run_dir, _, _ = exported(family)  # the round trip's run
    merged_dir = run_dir / "merged"
    merged = load_file(str(merged_dir / "model.safetensors"))
    base = load_file(f"{report_base_path(run_dir)}/model.safetensors")
    config = json.loads((merged_dir / "config.json").read_text())
    text = config["text_config"]
    for key in merged:
        mapped = vllm_name(key, family)
        assert mapped is not None and unknown_modules(mapped) == [], (key, mapped)
    assert tied_in_vllm() and ("lm_head.weight" in merged) == (not text["tie_word_embeddings"])
    assert merged.keys() == base.keys()
    report = json.loads((merged_dir / "export_report.json").read_text())
    if FAMILIES[family].router is None:
        assert report["published_layout"] == {"rewritten": 0, "mismatches": []}
        return
    layers, experts = text["num_hidden_layers"], text.get("num_local_experts") or text["num_experts"]
    hidden, inter = text["hidden_size"], text["moe_intermediate_size"]
    assert report["published_layout"] == {"rewritten": 2 * layers, "mismatches": []}
    per_expert = FAMILIES[family].per_expert_in_checkpoint is not None
    model = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    torch.manual_seed(0)
    x = torch.randn(5, hidden)
    for layer in range(layers):
        prefix = f"model.language_model.layers.{layer}.mlp"
        if per_expert:  # experts.<e>.{gate,up,down}_proj.weight, none fused
            assert f"{prefix}.experts.gate_up_proj" not in merged and f"{prefix}.experts.down_proj" not in merged
            names = [f"{prefix}.experts.{e}.{p}.weight" for e in range(experts) for p in ("gate_proj", "up_proj")]
            assert all(merged[n].shape == (inter, hidden) for n in names)
            assert all(
                merged[f"{prefix}.experts.{e}.down_proj.weight"].shape == (hidden, inter) for e in range(experts)
            )
            # the experts' LoRA merged in (an expert no token was routed to in 5 steps keeps its weights)
            assert any(f"{prefix}.experts." in n and not torch.equal(merged[n], base[n]) for n in merged)
        else:
            gate_up, down = merged[f"{prefix}.experts.gate_up_proj"], merged[f"{prefix}.experts.down_proj"]
            assert gate_up.shape == (experts, hidden, 2 * inter) and down.shape == (experts, inter, hidden)
            assert not torch.equal(gate_up, base[f"{prefix}.experts.gate_up_proj"])  # the experts' LoRA merged in
        assert torch.equal(merged[f"{prefix}.gate.weight"], base[f"{prefix}.gate.weight"])  # the router: frozen
        loaded = model.model.language_model.layers[layer].mlp.experts
        for expert in range(experts):
            gate, up = torch.nn.functional.linear(x, loaded.gate_up_proj[expert]).chunk(2, dim=-1)
            expected = torch.nn.functional.linear(loaded.act_fn(gate) * up, loaded.down_proj[expert])
            if per_expert:
                own = {
                    p: merged[f"{prefix}.experts.{expert}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")
                }
                got = vllm_per_expert_output(own, x)
                # and they are the split of what transformers holds after loading them
                fused = split_per_expert(f"{prefix}.experts.gate_up_proj", loaded.gate_up_proj.detach())
                assert torch.equal(fused[f"{prefix}.experts.{expert}.up_proj.weight"], own["up_proj"])
            else:
                got = vllm_expert_output(gate_up, down, expert, x)
            assert torch.allclose(got, expected.detach(), atol=1e-5), (layer, expert)


def run_in_process(overrides, train=True, export=True):
    """The train and export commands in this process (their command-line exit path is tested once, below)."""
    from finetune.cli.main import run_command

    for command, wanted in (("train", train), ("export", export)):
        if wanted:
            assert run_command(command, overrides) == 0


def report_base_path(run_dir):
    from finetune.model.tiny import resolve_model_path

    config = (run_dir / "config.yaml").read_text()
    name = next(line.split(": ", 1)[1] for line in config.splitlines() if line.strip().startswith("name_or_path:"))
    return resolve_model_path(name)


def test_export_keeps_what_the_vision_side_learned(tmp_path):
    """ViT LoRA and a fully trained merger (PEFT modules_to_save) end up in the merged weights; the frozen
    patch embed and the base LLM weights outside LoRA's reach stay the base model's."""
    from safetensors.torch import load_file

    train_file = mini_dataset(tmp_path / "train.json")
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides("qwen2_5_vl", run_dir, train_file, steps=3) + [
        "parts.vision_tower=lora",
        "parts.merger=full",
        "parts.merger_lr=1e-2",
    ]
    run_in_process(overrides)
    report = json.loads((run_dir / "merged" / "export_report.json").read_text())
    assert report["passed"] and report["max_abs_logit_diff"] <= 1e-4

    merged = load_file(str(run_dir / "merged" / "model.safetensors"))
    base = load_file(f"{report_base_path(run_dir)}/model.safetensors")
    assert merged.keys() == base.keys()
    from finetune.model.trainable import model_part

    moved = {k for k in base if not torch.equal(merged[k], base[k])}
    family = FAMILIES["qwen2_5_vl"]
    merger = {k for k in base if model_part(k, family) == "merger"}
    assert merger and merger <= moved  # every merger weight trained and exported
    assert any(
        model_part(k, family) == "vision_tower" and k.endswith("qkv.weight") for k in moved
    )  # ViT LoRA merged in
    assert not any("patch_embed" in k or "norm" in k or "embed_tokens" in k for k in moved - merger)


def assert_served_grids_are_trained_grids(merged, overrides, media_root):
    """Plain transformers on the merged folder sizes images and videos of many shapes as training did."""
    from finetune.data.encode import ConversationEncoder
    from finetune.exporting.videos import rate_differences
    from finetune.recipe.load import load_config
    from tests.helpers.serving_media import assert_same_grids, served_grids, trained_grids, write_media

    images, videos = write_media(media_root)
    # Videos transformers' own loader reads at another frame rate (Matroska's millisecond timestamps) render otherwise
    # when it reads the file (docs/fidelity.md, "Frame rate"); the others must give the training grids.
    other_rate = {d["path"] for d in rate_differences([str(v) for v in videos])}
    assert all(Path(p).suffix in (".mkv", ".webm") for p in other_rate), other_rate
    videos = [v for v in videos if str(v) not in other_rate]
    config = load_config(overrides)
    encoder = ConversationEncoder(AutoProcessor.from_pretrained(merged), vision_settings(config))
    assert_same_grids(trained_grids(encoder, images, videos), served_grids(merged, images, videos))


def _other_base_model(path):
    """A Qwen2.5-VL checkpoint of another shape (1 LLM layer): an adapter of the tiny model does not belong to it."""
    from transformers import AutoConfig

    from finetune.model.tiny import tiny_checkpoint

    source = tiny_checkpoint("qwen2_5_vl")
    config = AutoConfig.from_pretrained(source)
    config.text_config.num_hidden_layers = 1
    config.text_config.layer_types = config.text_config.layer_types[:1]
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    AutoProcessor.from_pretrained(source).save_pretrained(path)
    return path


def test_export_refuses_clearly_and_exports_bf16(tmp_path):
    from safetensors import safe_open

    from finetune.base.errors import ConfigError
    from finetune.exporting.export import check_adapter_base, export
    from finetune.recipe.load import load_config
    from tests.helpers.serving_media import OTHER_BUDGETS

    train_file = mini_dataset(tmp_path / "train.json", per_task=2)
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides("qwen2_5_vl", run_dir, train_file, steps=3) + OTHER_BUDGETS

    def refused(extra, match):  # in-process: every refusal is a ConfigError raised before anything is written
        with pytest.raises(ConfigError, match=match):
            export(load_config(overrides + extra))

    # Through the command line once: the refusal is one clean line and exit status 2.
    result = run_module("finetune.export", overrides, expect_failure=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "error: No LoRA adapter" in result.stderr
    run_in_process(overrides, export=False)
    refused([f"model.name_or_path={_other_base_model(tmp_path / 'other')}"], "a different model from the recipe's")
    # Another base by name only (a hub id: the recipe itself refuses one with the demo, so the check is asked alone)
    with pytest.raises(ConfigError, match="was trained on .*, but the recipe's base model is someone/another-model"):
        check_adapter_base(run_dir / "adapter", "someone/another-model")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    refused([f"export.output_dir={tmp_path / 'occupied'}"], "already exists and is not empty")
    refused([f"export.output_dir={tmp_path / 'occupied'}", "export.overwrite=true"], "not an earlier export")
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine"

    run_in_process(overrides, train=False)
    refused([], "Set export.overwrite=true")
    # An fp32 run exported in bf16, in shards: reloads and passes the dtype-aware check.
    export(load_config(overrides + ["export.overwrite=true", "export.dtype=bf16", "export.max_shard_size=300KB"]))
    merged = run_dir / "merged"
    report = json.loads((merged / "export_report.json").read_text())
    assert report["passed"] and (report["precision"], report["dtype"]) == ("fp32", "bf16")
    assert report["merge_max_abs_logit_diff"] <= 1e-4 and 1e-4 < report["max_abs_logit_diff"] <= report["atol"]
    shards = sorted(merged.glob("model-*.safetensors"))
    assert (
        len(shards) > 1
        and (merged / "model.safetensors.index.json").exists()
        and not (merged / "model.safetensors").exists()
    )
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert AutoModelForImageTextToText.from_pretrained(merged).dtype == torch.bfloat16
    assert_served_grids_are_trained_grids(merged, overrides, tmp_path / "media")  # other budgets
