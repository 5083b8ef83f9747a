"""QLoRA (`model.quantization=nf4`) on every dense family's tiny model, on the CPU (bitsandbytes >= 0.47 runs 4-bit
layers there): what is 4-bit and what is not (counted), LoRA's gradients on the 4-bit base, the adapter's round trip
as evaluate and predict load it (the base in 4 bits, as it trained), and the export's merge into a fresh 16-bit base
within the 4-bit model's own error; the mixture-of-experts families' fused experts (kept 16-bit); the refusals.
The demo's loss over 20 QLoRA steps and the real export (reload by plain transformers): test_qlora_demo.py. Both run in
a process of their own with bitsandbytes on its path (tests/integration/test_qlora.py).
"""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.model.trainable import model_part
from finetune.recipe.load import load_config
from tests.helpers import REPO
from tests.helpers.recipe_runs import mini_dataset, tiny_run_overrides

DENSE = [name for name, family in FAMILIES.items() if family.router is None]
MOE = [name for name, family in FAMILIES.items() if family.router is not None]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return mini_dataset(tmp_path_factory.mktemp("qlora") / "train.json", per_task=1)


def recipe(family, run_dir, data_file, *extra):
    return load_config(tiny_run_overrides(family, run_dir, data_file) + ["model.quantization=nf4", *extra])


def training_batch(config, processor, model):
    """An image and a video sample, padded, with labels and the recipe's positions."""
    from finetune.exporting.export import reference_samples
    from finetune.model.batching import inference_batch
    from finetune.model.load import position_rule
    from finetune.recipe.data_settings import conversation_encoder

    encoder = conversation_encoder(processor, config)
    encoded = [encoder.encode(sample) for sample in reference_samples(config)[:2]]
    return inference_batch(encoded, processor.tokenizer.pad_token_id, position_rule(model, config.model))


def lora_weights(model):
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


@pytest.fixture(scope="module", params=DENSE)
def qlora(request, tmp_path_factory, data_file):
    """One family's QLoRA model as training builds it (4-bit base, LoRA per the recipe), one backward, and its adapter
    saved where a run saves it."""
    from finetune.model.load import load_model, load_processor
    from finetune.model.trainable import make_trainable
    from finetune.records.rundir import RunDir

    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    config = recipe(request.param, run_dir, data_file)
    processor = load_processor(config.model)
    model = make_trainable(load_model(config.model, "fp32"), config)
    batch = training_batch(config, processor, model)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero, which leaves every A without a gradient: a random B instead
        for name, p in lora_weights(model).items():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model(**batch).loss.backward()
    grads = {name: p.grad for name, p in lora_weights(model).items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    adapter = RunDir(run_dir).adapter
    model.save_pretrained(str(adapter))
    processor.save_pretrained(str(adapter))
    return SimpleNamespace(
        family=FAMILIES[request.param], config=config, model=model, grads=grads, inputs=inputs, logits=logits
    )


def test_the_llm_linear_layers_are_4_bit_and_the_vision_tower_mergers_and_lm_head_are_not(qlora):
    from finetune.model.load import load_model
    from finetune.model.quantization import four_bit_layers
    from finetune.model.trainable import base_model, count_parameters

    family, quantized = qlora.family, base_model(qlora.model)
    plain = load_model(qlora.config.model, "fp32", quantized=False)
    llm_linear = [
        name
        for name, module in plain.named_modules()
        if isinstance(module, torch.nn.Linear) and model_part(name, family) == "llm" and name != family.lm_head
    ]
    # under LoRA the 4-bit layer is the wrapper's `base_layer`
    four_bit = [name.removesuffix(".base_layer") for name in four_bit_layers(quantized)]
    assert llm_linear and sorted(four_bit) == sorted(llm_linear)
    # everything else stays a plain nn.Linear (bitsandbytes' Linear4bit is a subclass) in the run's dtype
    kept = {name: m for name, m in quantized.named_modules() if type(m) is torch.nn.Linear}
    tower = f"{family.inner_model}.{family.vision_tower}."
    vision = [name for name in kept if name.startswith(tower)]
    mergers = [name for name in vision if model_part(name, family) == "merger"]
    assert family.lm_head in kept and mergers and len(vision) > len(mergers)
    assert set(family.mergers) == {name[len(tower) :].split(".")[0] for name in mergers}  # DeepStack's too
    assert len(vision) == sum(1 for name in linear_layers(plain) if name.startswith(tower))
    for name in [*vision, family.lm_head]:
        assert kept[name].weight.dtype == torch.float32, name  # fp32 on the CPU
    # the log's parameter count counts a 4-bit weight as one weight (not its packed bytes)
    lora = sum(p.numel() for p in lora_weights(quantized).values())
    assert count_parameters(quantized)[1] - lora == count_parameters(plain)[1]


def linear_layers(model):
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_lora_gradients_on_the_4_bit_base_are_finite_and_non_zero(qlora):
    assert qlora.grads
    for name, grad in qlora.grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().max() > 0, name


def test_the_adapter_saves_and_reloads_onto_a_4_bit_base_to_identical_outputs(qlora):
    """As evaluate and predict load a QLoRA run (finetune/model/load.py load_trained_model): the base in 4 bits."""
    from finetune.model.load import load_trained_model
    from finetune.model.quantization import four_bit_layers

    model, _ = load_trained_model(qlora.config)
    assert len(four_bit_layers(model)) == len(four_bit_layers(qlora.model))
    with torch.no_grad():
        logits = model(**qlora.inputs).logits.float()
    assert torch.equal(logits, qlora.logits)


def test_the_merged_16_bit_export_is_within_the_4_bit_models_own_error(qlora):
    """The adapter merged into a fresh 16-bit base (finetune/exporting/export.py): exactly the 16-bit base + adapter,
    and as far from the trained 4-bit model as the tolerance the export states (2x the 4-bit base's own error)."""
    from finetune.exporting.export import QUANTIZATION_ERROR_FACTOR, logits_without_adapter, merge_into_16_bit_base
    from finetune.model.quantization import four_bit_layers

    mask = qlora.inputs["attention_mask"].bool()
    trained = {"adapter": qlora.logits, "base": logits_without_adapter(qlora.model, qlora.inputs)}
    merged, merge_diff, numbers, adapter_16 = merge_into_16_bit_base(qlora.config, qlora.inputs, trained, mask, 1e-4)
    assert not four_bit_layers(merged) and not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(**qlora.inputs).logits.float()
    scale = adapter_16.abs()[mask].max().item()
    assert merge_diff <= 1e-4 and (merged_logits - adapter_16).abs()[mask].max().item() <= 1e-5 * scale
    # the check is not vacuous: the 4-bit base differs from the 16-bit one, and the adapter moves the logits
    assert numbers["base_error"] > 1e-3 * scale
    assert (adapter_16 - logits_without_adapter_16(qlora)).abs()[mask].max().item() > numbers["base_error"] / 10
    gap = (merged_logits - qlora.logits).abs()[mask].max().item()
    assert gap == pytest.approx(numbers["adapter_gap"], rel=1e-4)
    assert gap <= QUANTIZATION_ERROR_FACTOR * numbers["base_error"]


def logits_without_adapter_16(qlora):
    from finetune.model.load import load_model

    with torch.no_grad():
        return load_model(qlora.config.model, "fp32", quantized=False)(**qlora.inputs).logits.float()


def test_moe_experts_stay_16_bit_and_take_lora(tmp_path, data_file, caplog):
    """transformers 5.23 holds the routed experts as fused 3-D parameters, not nn.Linear: bitsandbytes leaves them in
    the run's dtype (said in a log line); every nn.Linear of the LLM is 4-bit; LoRA goes on the experts as parameters."""
    import logging

    from finetune.model.load import load_model
    from finetune.model.quantization import four_bit_layers, fused_experts
    from finetune.model.trainable import make_trainable

    for name in MOE:
        family = FAMILIES[name]
        config = recipe(name, tmp_path / name, data_file)
        with caplog.at_level(logging.INFO, logger="finetune.model.quantization"):
            model = load_model(config.model, "fp32")
        layers = len(model.get_submodule(f"{family.inner_model}.{family.language_model}").layers)
        experts = fused_experts(model, family)
        params = dict(model.named_parameters())
        assert len(experts) == layers * len(family.expert_lora_targets)
        assert all(params[e].dim() == 3 and params[e].dtype == torch.float32 for e in experts)
        llm_linear = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and model_part(n, family) == "llm" and n != family.lm_head
        ]
        assert sorted(four_bit_layers(model)) == sorted(llm_linear)
        assert f"{family.title}'s {len(experts)} fused expert parameters stay float32" in caplog.text
        trained = make_trainable(model, config)  # PEFT target_parameters: an A and a B per expert parameter
        experts_module = f".{family.expert_lora_targets[0].rsplit('.', 1)[0]}."  # `.mlp.experts.`
        on_experts = [n for n, p in trained.named_parameters() if experts_module in n and "lora_" in n]
        assert len(on_experts) == 2 * len(experts)


def test_qwen3_5_is_warned_that_qlora_hurts_it(tmp_path, data_file, caplog):
    import logging

    from finetune.model.load import load_model

    with caplog.at_level(logging.WARNING, logger="finetune.model.quantization"):
        load_model(recipe("qwen3_5", tmp_path, data_file).model, "fp32")
    assert "QLoRA is known to hurt this family" in caplog.text and "linear-attention" in caplog.text


@pytest.mark.parametrize(
    "extra,match",
    [
        (["parts.llm=full"], r"parts.llm=full needs parts.llm=lora"),
        (["parts.llm=frozen", "parts.vision_tower=lora"], r"parts.llm=frozen needs parts.llm=lora"),
        (["deepspeed=zero3", "accelerate.processes_per_node=2"], r"ZeRO-3.*#5660.*deepspeed=zero2"),
        (["deepspeed=zero3_offload"], r"ZeRO-3.*#5660.*deepspeed=zero2"),
    ],
)
def test_qlora_refusals_name_the_fix(tmp_path, data_file, extra, match):
    with pytest.raises(ConfigError, match=match):
        recipe("qwen2_5_vl", tmp_path, data_file, *extra)


def test_qlora_under_fsdp_is_refused(tmp_path, data_file):
    """4-bit weights shard under FSDP2 only with a matching storage dtype (axolotl #2992), which nothing here proves."""
    with pytest.raises(ConfigError, match=r"under FSDP.*axolotl #2992.*deepspeed=zero2 or DDP"):
        recipe("qwen2_5_vl", tmp_path, data_file, "accelerate=fsdp2", "accelerate.processes_per_node=2")


@pytest.mark.parametrize("extra", [[], ["deepspeed=zero2"]])
def test_qlora_runs_under_ddp_and_zero_2(tmp_path, data_file, extra):
    """Each rank holds the whole 4-bit base there (nothing of it is sharded): allowed."""
    from finetune.runs.launch import accelerate_args

    config = recipe("qwen2_5_vl", tmp_path, data_file, "accelerate.processes_per_node=2", *extra)
    args = accelerate_args(config, {}, 0, "fp32")
    assert args[args.index("--num_processes") + 1] == "2"
    assert ("--use_deepspeed" in args) == bool(extra)


def test_qlora_without_bitsandbytes_is_refused_with_the_install(tmp_path, data_file, monkeypatch):
    from finetune.model.load import load_model
    from finetune.runs.launch import prepare_launch

    overrides = tiny_run_overrides("qwen2_5_vl", tmp_path / "run", data_file) + ["model.quantization=nf4"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    install = r"needs bitsandbytes.*pip install bitsandbytes \(or pip install -e '.\[qlora\]'\)"
    with pytest.raises(ConfigError, match=install):
        prepare_launch(overrides)  # before any process starts
    with pytest.raises(ConfigError, match=install):
        load_model(load_config(overrides).model, "fp32")  # `finetune train` started by hand


def test_help_and_the_launcher_do_not_import_bitsandbytes():
    """bitsandbytes costs ~2 s to import: only a process that loads a model (peft imports it there) pays it."""
    code = (
        "import sys, contextlib, io\n"
        "from finetune.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "from finetune.runs.launch import prepare_launch\n"
        "prepare_launch(['model.quantization=nf4'], dry_run=True)\n"
        "print(sorted(m for m in ('bitsandbytes', 'peft') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
