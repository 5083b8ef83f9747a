"""GPU training benchmark: the project's own training, per mode, on a random-init checkpoint with a published
model's exact shapes and a fixed mixed image/video/text dataset. Speed and memory do not depend on the weights.

    python benchmarks/gpu_train.py --model qwen2_5_vl_7b                      # one GPU: packed and unpacked
    python benchmarks/gpu_train.py --model qwen2_5_vl_72b --layers 8          # a big model, fewer layers
    python benchmarks/gpu_train.py --model qwen2_5_vl_7b --modes packed,zero2,zero3   # several GPUs
    python benchmarks/gpu_train.py --model qwen2_5_vl_7b --modes zero3,fsdp2          # ZeRO-3 against FSDP2
    python benchmarks/gpu_train.py --model qwen2_5_vl_7b --modes grpo                        # GRPO: rollout vs training
    python benchmarks/gpu_train.py --model tiny_qwen2_5_vl --cpu --samples 12 --steps 4   # the suite's CPU run

Steps: (1) the GPU's bf16 matmul peak (fp32 on the CPU) and the varlen-attention kernels' start-up check against
sdpa; (2) the checkpoint: the project's tiny tokenizer and processors with the model's real text and vision
shapes (SHAPES, the published configs), random weights in bf16; (3) the dataset from a fixed seed: by default
400 samples, 40 % video (640x360 MP4 at 30 fps, 6-20 s), 40 % image (800x600 ... 1280x720 JPEG), 20 % text;
(4) per mode one training run through `accelerate launch -m finetune.train` with the model's recipe
(`model=<name>`, packed rows of `data.max_length` 8192 tokens, LoRA r=8 on the LLM, frozen ViT, checkpointing,
at most 40 frames per video and caps of 1280 tokens per image and 300 per frame pair that leave this dataset's media
as they are and let the worst case fit the rows: finetune/recipe/budgets.py), `trainer.max_steps` steps, one
logged per step. Prints and writes (`--out`, JSON + markdown), per mode: real tokens/s per GPU (median of the
steps after `--warmup`), MFU, peak GPU memory allocated and reserved (torch.cuda, rank 0), and the share of step
time spent waiting for the DataLoader.

MFU = real tokens/s x 4 x N_llm / peak matmul FLOP/s, with N_llm the LLM's matmul parameters (decoder layers and
lm_head): a LoRA step does the forward (2N) and the activation gradients (2N) of the frozen LLM; the
recomputation under checkpointing, attention scores, the ViT and the LoRA weight gradients are not counted. A
hybrid LLM (Qwen3.5) counts each layer by its type: a full-attention layer's projections (q twice as wide: queries
and their output gate), a linear-attention layer's (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj); the
gated delta rule's own work, like attention scores, and the small depthwise conv1d are not counted.

The `grpo` mode (RL with verifiable rewards, finetune/training/grpo_trainer.py) trains `method=grpo` on prompts made
from the same dataset's image and video samples (build_prompts: a four-option question per sample, its `solution` a
letter the `choice` reward scores), --prompts-per-step prompts (default 2) of --generations completions each
(default 8; --cpu 2) of up to --completion-length tokens (default 256; --cpu 4), the KL to the base (adapter off) at
the preset's beta, unpacked. A random-init model almost never samples the end token, so every completion runs to
the length limit: a step costs what a trained model's would at that length. It reports, per step (medians after
`--warmup`, rank 0, from the trainer's `timing/` logs): the step's wall time, the rollout time (transformers'
`generate` of the step's completions with our positions), the rest (rewards, the reference and policy forwards,
backward, optimizer), generation's share of the step, completion tokens generated per second, and the peak memory;
no MFU (generation is memory-bound decoding, not the matmul count above).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The published configs (config.json of Qwen/<name>-Instruct): text decoder and vision tower shapes.
TEXT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)
QWEN2_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)  # + hidden_size (the LLM's)
QWEN2_5_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)  # + out_hidden_size (the LLM's)
# Qwen3-VL (8B, 30B-A3B): a 27-block ViT of width 1152 whose blocks 8, 16 and 24 feed DeepStack mergers; text
# layers with their own head_dim 128 and interleaved M-RoPE sections [24, 20, 20].
QWEN3_VISION = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
)  # + out_hidden_size (the LLM's)
QWEN3_TEXT = dict(
    head_dim=128,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5000000,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
)
# Qwen3.5 (transformers 5.23's config defaults, which it documents as the Qwen3.5-9B and Qwen3.5-35B-A3B styles; the
# published config.json files are not reachable here): a 27-block ViT of width 1152 without DeepStack; a hybrid LLM
# whose layers are Gated DeltaNet linear attention except every fourth (full attention, head_dim 256, q_proj doubled
# for the output gate), rotary on a quarter of each head (64 of 256 dims: interleaved sections [11, 11, 10], theta
# 1e7, as vLLM 0.33.0's recipes/models/Qwen/Qwen3.5-27B.yaml spells them). Linear attention: 16 key heads and 32 value
# heads of 128 (vLLM's tests: Qwen3.5-4B's GDN has 16 and 32, Qwen3.5-35B's 16 and 32).
QWEN3_5_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304)
QWEN3_5_TEXT = dict(
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
)
FULL_ATTENTION_INTERVAL = 4  # Qwen3.5: layers 4, 8, ... are full attention (transformers' full_attention_interval)
# name (a recipes/model/ name): (family, TEXT_FIELDS values, vision_config values, other text_config values); a None
# among the TEXT_FIELDS values leaves that field out (Qwen3.5-MoE's text config has no dense intermediate_size)
SHAPES = {
    "qwen2_vl_2b": ("qwen2_vl", (1536, 8960, 28, 12, 2, 151936, True), dict(QWEN2_VISION, hidden_size=1536), {}),
    "qwen2_vl_7b": ("qwen2_vl", (3584, 18944, 28, 28, 4, 152064, False), dict(QWEN2_VISION, hidden_size=3584), {}),
    "qwen2_5_vl_3b": (
        "qwen2_5_vl",
        (2048, 11008, 36, 16, 2, 151936, True),
        dict(QWEN2_5_VISION, out_hidden_size=2048),
        {},
    ),
    "qwen2_5_vl_7b": (
        "qwen2_5_vl",
        (3584, 18944, 28, 28, 4, 152064, False),
        dict(QWEN2_5_VISION, out_hidden_size=3584),
        {},
    ),
    "qwen2_5_vl_32b": (
        "qwen2_5_vl",
        (5120, 27648, 64, 40, 8, 152064, False),
        dict(QWEN2_5_VISION, out_hidden_size=5120),
        {},
    ),
    "qwen2_5_vl_72b": (
        "qwen2_5_vl",
        (8192, 29568, 80, 64, 8, 152064, False),
        dict(QWEN2_5_VISION, out_hidden_size=8192),
        {},
    ),
    "qwen3_vl_8b": (
        "qwen3_vl",
        (4096, 12288, 36, 32, 8, 151936, False),
        dict(QWEN3_VISION, out_hidden_size=4096),
        QWEN3_TEXT,
    ),
    # 128 experts of width 768, 8 per token, in each of the 48 layers (intermediate_size: the unused dense MLP's)
    "qwen3_vl_moe_30b_a3b": (
        "qwen3_vl_moe",
        (2048, 6144, 48, 32, 4, 151936, False),
        dict(QWEN3_VISION, out_hidden_size=2048),
        dict(QWEN3_TEXT, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1),
    ),
    # 32 layers (24 linear attention, 8 full), 248320-token vocabulary, untied: 9.4B parameters with the ViT. Packed
    # rows restart the linear attention at every sample (finetune/model/linear_attention.py: flash-linear-attention's
    # kernel with cu_seqlens when installed, else the PyTorch chunked rule per sample).
    "qwen3_5_9b": (
        "qwen3_5",
        (4096, 12288, 32, 16, 4, 248320, False),
        dict(QWEN3_5_VISION, out_hidden_size=4096),
        QWEN3_5_TEXT,
    ),
    # 256 experts of width 512, 8 per token, and a shared expert of width 512 in each of the 40 layers (30 linear
    # attention, 10 full): 35.1B parameters with the ViT, 3.0B activated in the LLM.
    "qwen3_5_moe_35b_a3b": (
        "qwen3_5_moe",
        (2048, None, 40, 16, 2, 248320, False),
        dict(QWEN3_5_VISION, out_hidden_size=2048),
        dict(
            QWEN3_5_TEXT,
            moe_intermediate_size=512,
            shared_expert_intermediate_size=512,
            num_experts=256,
            num_experts_per_tok=8,
        ),
    ),
    # The tests' tiny model as it is (finetune/model/tiny.py), built the same way: the suite's CPU run of this benchmark.
    "tiny_qwen2_5_vl": ("qwen2_5_vl", None, {}, {}),
}
MODES = {  # extra overrides per mode
    "packed": ["trainer.packing=true"],
    "unpacked": ["trainer.packing=false"],
    "zero2": ["trainer.packing=true", "deepspeed=zero2"],
    "zero3": ["trainer.packing=true", "deepspeed=zero3"],
    # PyTorch FSDP2 over the GPUs (the mode's accelerate group, with accelerate.fsdp_version=2: finetune/runs/launch.py)
    "fsdp2": ["trainer.packing=true", "accelerate.fsdp_version=2"],
    # RL with verifiable rewards on the image and video prompts (build_prompts); sizes from --generations,
    # --completion-length and --prompts-per-step (grpo_overrides)
    "grpo": ["trainer.packing=false", "method=grpo", "method.rewards=[choice]"],
}
# --generations and --completion-length when not given: a GPU-sized group, or a tiny one for the CPU run
GRPO_SIZES = {"cuda": (8, 256), "cpu": (2, 4)}
WORDS = "the a dot moves left right up down red green blue small large frame scene person walks runs car".split()


def llm_matmul_parameters(text: dict) -> int:
    """Decoder-layer projections (q, k, v, o, gate, up, down) and the lm_head; a mixture of experts counts the
    experts a token goes through (num_experts_per_tok), the router and a shared expert with its gate: the active
    parameters. A hybrid LLM (Qwen3.5, `layer_types`) counts each layer's token mixer by its type: full attention
    (q_proj twice as wide: queries and their output gate) or Gated DeltaNet linear attention (in_proj_qkv, in_proj_z,
    in_proj_b, in_proj_a, out_proj)."""
    hidden, heads, kv_heads = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or hidden // heads  # Qwen3: its own (128), not hidden / heads
    gated = str(text.get("model_type", "")).startswith("qwen3_5")  # Qwen3.5's q_proj: queries + output gate
    attention = (3 if gated else 2) * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mixers = {"full_attention": attention}
    if "linear_num_value_heads" in text:
        keys = text["linear_num_key_heads"] * text["linear_key_head_dim"]
        values = text["linear_num_value_heads"] * text["linear_value_head_dim"]
        # in_proj_qkv (q, k, v), in_proj_z (the gate), in_proj_b and in_proj_a (one scalar per value head), out_proj
        mixers["linear_attention"] = (
            hidden * (2 * keys + values) + 2 * hidden * values + 2 * hidden * text["linear_num_value_heads"]
        )
    experts = text.get("num_local_experts") or text.get("num_experts")  # to_dict() spells it num_local_experts
    if experts:
        mlp = text["num_experts_per_tok"] * 3 * hidden * text["moe_intermediate_size"] + hidden * experts
        if text.get("shared_expert_intermediate_size"):  # the shared expert and its one-output gate
            mlp += 3 * hidden * text["shared_expert_intermediate_size"] + hidden
    else:
        mlp = 3 * hidden * text["intermediate_size"]
    layer_types = text.get("layer_types") or ["full_attention"] * text["num_hidden_layers"]
    return sum(mixers[kind] + mlp for kind in layer_types[: text["num_hidden_layers"]]) + hidden * text["vocab_size"]


def model_config(name: str, layers: int | None):
    """The tiny checkpoint's config (its token ids match the tiny tokenizer) with the model's real shapes."""
    from transformers import AutoConfig

    from finetune.model.tiny import tiny_checkpoint

    family, text, vision, other_text = SHAPES[name]
    config = AutoConfig.from_pretrained(tiny_checkpoint(family))
    for key, value in [*zip(TEXT_FIELDS, text or ()), *other_text.items()]:
        if value is not None:
            setattr(config.text_config, key, value)
    if layers:
        config.text_config.num_hidden_layers = layers
    # layer_types was sized for the tiny model's layer count: Qwen-VL text layers are all full attention; a hybrid
    # LLM's (Qwen3.5) are linear attention but for every FULL_ATTENTION_INTERVAL-th.
    count = config.text_config.num_hidden_layers
    hybrid = "linear_attention" in (getattr(config.text_config, "layer_types", None) or [])
    config.text_config.layer_types = [
        "full_attention" if not hybrid or (i + 1) % FULL_ATTENTION_INTERVAL == 0 else "linear_attention"
        for i in range(count)
    ]
    config.tie_word_embeddings = getattr(config.text_config, "tie_word_embeddings", config.tie_word_embeddings)
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    return config


def build_checkpoint(name: str, layers: int | None, out: Path, device: str) -> tuple[Path, dict]:
    """A loadable checkpoint directory: the model's shapes, random bf16 (CPU: fp32) weights, the tiny tokenizer."""
    import torch
    from transformers import AutoModelForImageTextToText

    from finetune.model.tiny import tiny_checkpoint

    family = SHAPES[name][0]
    folder = out / f"checkpoint-{name}{f'-{layers}layers' if layers else ''}"
    config = model_config(name, layers)
    if not (folder / "config.json").exists():
        start = time.perf_counter()
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(
                config, dtype=torch.bfloat16 if device == "cuda" else torch.float32
            )
        model.save_pretrained(folder)
        del model
        for item in Path(tiny_checkpoint(family)).iterdir():
            if item.suffix != ".safetensors" and item.name != "config.json":
                shutil.copy(item, folder / item.name)
        print(f"checkpoint {folder} written in {time.perf_counter() - start:.0f} s", flush=True)
    text = config.text_config.to_dict()
    return folder, {"parameters_llm_matmul": llm_matmul_parameters(text), "layers": text["num_hidden_layers"]}


def _write_video(args) -> None:
    import av
    import numpy as np

    path, seconds, fps, width, height, seed = args
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, 3)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28"}
        for i in range(int(seconds * fps)):
            shade = ((x + y + i / (fps * 4)) % 1.0)[..., None] * colour
            frame = shade.astype(np.uint8)
            cx, cy = int((i * 7) % width), int(height / 2 + height / 3 * math.sin(i / fps))
            frame[max(0, cy - 8) : cy + 8, max(0, cx - 8) : cx + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_dataset(out: Path, samples: int, seed: int, small: bool) -> Path:
    """The benchmark's data from a fixed seed: 40 % video, 40 % image, 20 % text (small: tiny media for the CPU)."""
    import numpy as np
    from PIL import Image

    folder = out / f"data-{samples}-{seed}{'-small' if small else ''}"
    dataset = folder / "train.json"
    if dataset.exists():
        return dataset
    (folder / "media").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records, videos = [], []
    for i in range(samples):
        kind = "video" if i % 5 < 2 else "image" if i % 5 < 4 else "text"
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) + "?"
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) + "."
        record = {
            "id": f"s{i}",
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        }
        if kind == "video":
            path = folder / "media" / f"v{i}.mp4"
            seconds = 2 if small else rng.uniform(6, 20)
            videos.append((path, seconds, 8 if small else 30, 64 if small else 640, 48 if small else 360, seed + i))
            record["videos"], record["messages"][0]["content"] = [path.name], "<video>" + question
        elif kind == "image":
            width, height = (96, 64) if small else rng.choice([(800, 600), (1024, 768), (1280, 720)])
            pixels = np.random.default_rng(seed + i).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((width, height)).save(folder / "media" / f"i{i}.jpg", quality=90)
            record["images"], record["messages"][0]["content"] = [f"i{i}.jpg"], "<image>" + question
        records.append(record)
    start = time.perf_counter()
    with Pool(max(1, min(len(videos), os.cpu_count() or 1))) as pool:
        pool.map(_write_video, videos)
    dataset.write_text(json.dumps(records))
    print(f"{samples} samples ({len(videos)} videos) written to {folder} in {time.perf_counter() - start:.0f} s")
    return dataset


def build_prompts(dataset: Path, seed: int) -> Path:
    """The grpo mode's prompts, from the dataset's image and video samples (the same media): each question asks which
    of four options fits, with a `solution` letter the `choice` reward scores (a random-init model rarely states one:
    its completions run to max_completion_length and score no reward, which times a step as a trained model's would
    at that length)."""
    prompts = dataset.parent / "prompts.json"
    if prompts.exists():
        return prompts
    rng = random.Random(seed)
    records = []
    for record in json.loads(dataset.read_text()):
        media = "videos" if "videos" in record else "images" if "images" in record else None
        if media is None:  # text samples: the mode times generation over media prompts
            continue
        options = rng.sample(WORDS, 4)
        listed = " ".join(f"{letter}. {word}" for letter, word in zip("ABCD", options))
        tag = "<video>" if media == "videos" else "<image>"
        question = f"{tag}Which word fits what you see? {listed}. Answer with the option's letter."
        records.append(
            {
                "id": record["id"],
                "messages": [{"role": "user", "content": question}],
                "solution": rng.choice("ABCD"),
                media: record[media],
            }
        )
    prompts.write_text(json.dumps(records))
    return prompts


def grpo_overrides(args, device: str) -> list[str]:
    """The grpo mode's group size, completion length and batch: trainer.per_device_train_batch_size counts
    completions (prompts per step x generations)."""
    generations, length = GRPO_SIZES[device]
    generations, length = args.generations or generations, args.completion_length or length
    return [
        f"method.num_generations={generations}",
        f"method.max_completion_length={length}",
        f"trainer.per_device_train_batch_size={generations * args.prompts_per_step}",
    ]


def matmul_peak(device: str) -> tuple[float, str]:
    """Measured matmul throughput (FLOP/s): bf16 8192^3 on a GPU, fp32 1024^3 on the CPU."""
    import torch

    size, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    iterations = 50 if device == "cuda" else 5
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    flops = 2 * size**3 * iterations / (time.perf_counter() - start)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return flops, f"{str(dtype).removeprefix('torch.')} {size}^3 matmul"


def kernel_checks(device: str) -> dict:
    """Each varlen-attention kernel's start-up check against sdpa with the block mask (finetune/model/attention.py)."""
    import torch

    from finetune.model.attention import disagreement_with_sdpa

    kernels = ["per_sample"] + (["torch", "flash_attn"] if device == "cuda" else [])
    dtypes = [torch.bfloat16, torch.float32] if device == "cuda" else [torch.float32]
    return {
        f"{kernel}/{str(dtype).removeprefix('torch.')}": disagreement_with_sdpa(kernel, torch.device(device), dtype)
        or "agrees with sdpa"
        for kernel in kernels
        for dtype in dtypes
    }


def mode_overrides(
    name: str, mode: str, checkpoint: Path, dataset: Path, args, run_dir: Path, gpus: int, extra: tuple = ()
) -> list[str]:
    """The recipe of one mode's run (gpus: the GPUs of this machine; --cpu runs on the CPU; extra: overrides of this
    run only, e.g. --sequence-parallel's)."""
    from finetune.base.families import FAMILIES

    return [
        "~experiment",  # no experiment: the keys below are the whole recipe (a demo experiment takes tiny:// only)
        f"name=gpu_train_{name}_{mode}",
        f"model={name}",
        f"model.name_or_path={checkpoint}",
        "model.video_max_frames=40",  # the longest video (20 s at 2 fps); 64 before 2026-12-06, the same plans
        # The demo's LoRA, which the published figures were measured with.
        "peft.r=8",
        "peft.alpha=16",
        "peft.dropout=0",
        # Budgets whose worst case (a 4000x3000 photo, a 10-minute video: finetune/recipe/budgets.py) fits the rows;
        # this dataset's media (<= 1280x720 images, 640x360 videos of <= 20 s: <= 40 frames) are sized as before.
        *([] if name.startswith("tiny_") else ["model.max_pixels=1003520", "model.video_max_pixels=235200"]),
        "data=custom",
        f"data.train={dataset}",
        f"data.media_root={dataset.parent / 'media'}",
        "data.max_length=8192",
        "data.eval=null",
        "evaluation.after_training=false",
        "export.after_training=false",
        "trainer=default",
        f"trainer.max_steps={args.steps}",
        "trainer.gradient_accumulation_steps=1",
        "trainer.logging_steps=1",
        "trainer.save_steps=100000",
        f"trainer.dataloader_num_workers={args.workers}",
        f"trainer.output_dir={run_dir}",
        "logger=none",
        # LoRA on fused experts takes no dropout (PEFT): the MoE models' LoRA is on attention and experts
        *(["peft.dropout=0"] if FAMILIES[SHAPES[name][0]].expert_lora_targets else []),
        "accelerate=cpu" if args.cpu else ("accelerate=multi_gpu" if gpus > 1 else "accelerate=single_gpu"),
        *MODES[mode],
        *(grpo_overrides(args, "cpu" if args.cpu else "cuda") if mode == "grpo" else []),
        *extra,
        *args.override,
    ]


def sequence_parallel_overrides(n: int, row_tokens: int) -> list[str]:
    """A packed run whose rows of `row_tokens` are split across n GPUs (trainer.sequence_parallel; varlen attention)."""
    return [
        f"trainer.sequence_parallel={n}",
        "model.attn_implementation=varlen",
        f"trainer.max_tokens_per_row={row_tokens}",
        f"data.max_length={row_tokens}",
    ]


def longest_rows(name: str, checkpoint: Path, dataset: Path, args, out: Path, run=None) -> list[dict]:
    """--sequence-parallel: for each N, packed runs with rows of growing length (--row-tokens) until one fails (out of
    memory, or a refusal such as N not dividing the heads); per N the longest row that trained, with its tokens/s per
    GPU and peak memory, and where and why it stopped."""
    run = run or train_mode
    rows = []
    for n in (int(v) for v in args.sequence_parallel.split(",")):
        fitted, stopped = None, None
        for tokens in (int(v) for v in args.row_tokens.split(",")):
            result = run(
                name,
                "packed",
                checkpoint,
                dataset,
                args,
                out,
                sequence_parallel_overrides(n, tokens),
                f"sp{n}-{tokens}",
            )
            if "error" in result:
                stopped = {"stopped_at_row_tokens": tokens, "error": result["error"]}
                break
            fitted = {"longest_row_tokens": tokens, **{k: v for k, v in result.items() if k != "mode"}}
        rows.append(
            {"mode": f"sp{n}", "sequence_parallel": n, **(fitted or {"longest_row_tokens": 0}), **(stopped or {})}
        )
    return rows


def train_mode(
    name: str, mode: str, checkpoint: Path, dataset: Path, args, out: Path, extra: tuple = (), label: str | None = None
) -> dict:
    """One training run of the mode (`extra`: this run's own overrides, `label` its name); the figures from its
    log_history.json."""
    import torch

    from finetune.model.load import recipe_precision
    from finetune.recipe.load import load_config
    from finetune.runs.launch import accelerate_args

    run_dir = out / f"run-{name}-{label or mode}"
    if mode == "grpo":
        dataset = build_prompts(dataset, args.seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = mode_overrides(name, mode, checkpoint, dataset, args, run_dir, torch.cuda.device_count(), extra)
    config = load_config(overrides)
    launch = accelerate_args(
        config, dict(os.environ), 0 if args.cpu else torch.cuda.device_count(), recipe_precision(config)
    )
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "finetune.train", *overrides]
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    (out / f"run-{name}-{label or mode}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        return {"mode": mode, "error": f"exit {result.returncode}: {tail}"}
    history = [h for h in json.loads((run_dir / "log_history.json").read_text()) if "tokens_per_second_per_device" in h]
    measured = [h for h in history if h["step"] > args.warmup] or history
    attention = next(
        (line.split("attention: ", 1)[1] for line in result.stderr.splitlines() if "attention: " in line), "?"
    )
    if mode == "grpo":
        return {
            "mode": mode,
            **grpo_figures(history, measured, config),
            "attention": attention,
            "seconds": round(time.perf_counter() - start, 1),
        }
    return {
        "mode": mode,
        "steps_measured": len(measured),
        "tokens_per_second_per_gpu": statistics.median(h["tokens_per_second_per_device"] for h in measured),
        "data_wait_fraction": statistics.median(h.get("data_wait_fraction", 0.0) for h in measured),
        "peak_memory_allocated_gib": max((h.get("peak_memory_allocated_gib", 0.0) for h in history), default=0.0),
        "peak_memory_reserved_gib": max((h.get("peak_memory_reserved_gib", 0.0) for h in history), default=0.0),
        "attention": attention,
        "seconds": round(time.perf_counter() - start, 1),
    }


def grpo_figures(history: list[dict], measured: list[dict], config) -> dict:
    """Medians over the measured steps of what the GRPO trainer logs per step (finetune/training/grpo_trainer.py):
    the step's time, generation's part of it (rollouts) and the rest (scoring, reference and policy forwards,
    backward, optimizer), generation's share, completion tokens generated per second, and the peaks."""

    def median(key: str) -> float:
        return statistics.median(h[key] for h in measured)

    return {
        "steps_measured": len(measured),
        "prompts_per_step": config.trainer.per_device_train_batch_size // config.method.num_generations,
        "generations": config.method.num_generations,
        "max_completion_length": config.method.max_completion_length,
        "mean_completion_length": median("completions/mean_length"),
        "step_s": median("timing/step_s"),
        "rollout_s": median("timing/rollout_s"),
        "train_s": median("timing/train_s"),
        "rollout_share": median("timing/rollout_share"),
        "generated_tokens_per_second_per_gpu": median("rollout/tokens_per_second"),
        "trained_completion_tokens_per_second_per_gpu": median("tokens_per_second_per_device"),
        "peak_memory_allocated_gib": max((h.get("peak_memory_allocated_gib", 0.0) for h in history), default=0.0),
        "peak_memory_reserved_gib": max((h.get("peak_memory_reserved_gib", 0.0) for h in history), default=0.0),
    }


def grpo_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "GRPO (per step, rank 0): rollout = generation of the step's completions; train = the rest of the step "
        "(rewards, reference and policy forwards, backward, optimizer)",
        "",
        "| mode | prompts x generations, completion tokens | step s | rollout s | train s | generation's share | "
        "generated tokens/s | peak allocated GiB | peak reserved GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['mode']} | failed: {row['error'].splitlines()[-1][:80]} | | | | | | | |")
            continue
        lines.append(
            f"| {row['mode']} | {row['prompts_per_step']} x {row['generations']}, {row['mean_completion_length']:.0f} "
            f"(max {row['max_completion_length']}) | {row['step_s']:.2f} | {row['rollout_s']:.2f} | "
            f"{row['train_s']:.2f} | {row['rollout_share']:.1%} | {row['generated_tokens_per_second_per_gpu']:,.0f} | "
            f"{row['peak_memory_allocated_gib']:.1f} | {row['peak_memory_reserved_gib']:.1f} |"
        )
    return lines


def markdown(report: dict) -> str:
    lines = [
        f"{report['model']} ({report['layers']} LLM layers), {report['device']}, {report['date']}; peak "
        f"{report['peak_flops'] / 1e12:.1f} TFLOP/s ({report['peak_measured_with']}); MFU = tokens/s x 4 x "
        f"{report['parameters_llm_matmul'] / 1e9:.3g} B / peak",
    ]
    sft = [row for row in report["modes"] if row["mode"] != "grpo" and "sequence_parallel" not in row]
    if sft:
        lines += [
            "",
            "| mode | real tokens/s per GPU | MFU | peak allocated GiB | peak reserved GiB | data wait | attention |",
            "|---|---|---|---|---|---|---|",
        ]
    for row in sft:
        if "error" in row:
            lines.append(f"| {row['mode']} | failed: {row['error'].splitlines()[-1][:80]} | | | | | |")
            continue
        lines.append(
            f"| {row['mode']} | {row['tokens_per_second_per_gpu']:,.0f} | {row['mfu']:.1%} | "
            f"{row['peak_memory_allocated_gib']:.1f} | {row['peak_memory_reserved_gib']:.1f} | "
            f"{row['data_wait_fraction']:.1%} | {row['attention']} |"
        )
    grpo = [row for row in report["modes"] if row["mode"] == "grpo"]
    lines += grpo_markdown(grpo) if grpo else []
    split = [row for row in report["modes"] if "sequence_parallel" in row]
    if split:
        lines += [
            "",
            "| sequence parallel | longest row trained (tokens) | real tokens/s per GPU | peak allocated GiB | stopped at |",
            "|---|---|---|---|---|",
        ]
    for row in split:
        stop = f"{row['stopped_at_row_tokens']:,}: {row['error'].splitlines()[-1][:60]}" if "error" in row else "-"
        fitted = row["longest_row_tokens"]
        figures = (
            f"{row['tokens_per_second_per_gpu']:,.0f} | {row['peak_memory_allocated_gib']:.1f}" if fitted else "- | -"
        )
        lines.append(f"| {row['sequence_parallel']} | {fitted:,} | {figures} | {stop} |")
    lines += ["", "varlen kernel checks: " + "; ".join(f"{k}: {v}" for k, v in report["kernel_checks"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Modes: packed, unpacked (one GPU) and zero2, zero3, fsdp2 (several GPUs) train SFT and report real tokens/s per "
        "GPU, MFU, peak memory and the data wait; grpo trains method=grpo on the dataset's image and video prompts and "
        "reports per step the rollout (generation) time, the training time, generation's share of the step, generated "
        "tokens/s and peak memory. A GRPO run on one GPU: python benchmarks/gpu_train.py --model qwen2_5_vl_7b "
        "--modes grpo",
    )
    parser.add_argument("--model", default="qwen2_5_vl_7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="LLM layer count override (the big models)")
    parser.add_argument("--modes", default="packed,unpacked", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--workers", type=int, default=4, help="trainer.dataloader_num_workers")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (small media; the suite's check)")
    parser.add_argument(
        "--generations",
        type=int,
        default=None,
        help=f"grpo: completions per prompt (default {GRPO_SIZES['cuda'][0]}; --cpu {GRPO_SIZES['cpu'][0]})",
    )
    parser.add_argument(
        "--completion-length",
        type=int,
        default=None,
        help=f"grpo: max_completion_length (default {GRPO_SIZES['cuda'][1]}; --cpu {GRPO_SIZES['cpu'][1]})",
    )
    parser.add_argument("--prompts-per-step", type=int, default=2, help="grpo: prompts per step and GPU (default 2)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_bench")
    parser.add_argument("--override", action="append", default=[], help="another recipe override for every mode")
    parser.add_argument(
        "--sequence-parallel",
        default=None,
        help="comma-separated N (e.g. 1,2,4,8): per N, the longest packed row that trains (trainer.sequence_parallel=N)"
        " and its tokens/s per GPU; after the --modes",
    )
    parser.add_argument(
        "--row-tokens",
        default="8192,16384,32768,65536,131072,262144",
        help="--sequence-parallel: the row lengths tried in turn, up to the first that fails",
    )
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no GPU visible; use --cpu for the small CPU run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    peak, measured_with = matmul_peak(device)
    checks = kernel_checks(device)
    print(f"peak {peak / 1e12:.2f} TFLOP/s ({measured_with}); kernel checks: {checks}", flush=True)
    checkpoint, sizes = build_checkpoint(args.model, args.layers, args.out, device)
    dataset = build_dataset(args.out, args.samples, args.seed, small=args.cpu)
    report = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "gpus": torch.cuda.device_count() if device == "cuda" else 0,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "peak_flops": peak,
        "peak_measured_with": measured_with,
        "kernel_checks": checks,
        **sizes,
        "mfu_formula": "real tokens/s x 4 x parameters_llm_matmul / peak_flops",
        "modes": [],
    }
    for mode in filter(None, args.modes.split(",")):  # --modes "" with --sequence-parallel: only the row search
        row = train_mode(args.model, mode, checkpoint, dataset, args, args.out)
        if "tokens_per_second_per_gpu" in row:  # the SFT modes (grpo reports its own figures)
            row["mfu"] = row["tokens_per_second_per_gpu"] * 4 * sizes["parameters_llm_matmul"] / peak
        report["modes"].append(row)
        print(json.dumps(row), flush=True)
    if args.sequence_parallel:
        for row in longest_rows(args.model, checkpoint, dataset, args, args.out):
            report["modes"].append(row)
            print(json.dumps(row), flush=True)
    (args.out / "gpu_train.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "gpu_train.md").write_text(table + "\n")
    print("\n" + table)
    # --sequence-parallel stops each N at its first failing row: that is its figure, not a failure of the benchmark
    return 1 if any("error" in row and "sequence_parallel" not in row for row in report["modes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
