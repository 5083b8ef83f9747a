"""Every GPU experiment fits its data: the worst-case image (a 4000x3000 photo) and video (10 minutes at 30 fps, 2160p
and 1080p), sized by qwen-vl-utils' own functions from the composed recipe, fit data.max_length with room for the
conversation; the recipe's own sizing (finetune/recipe/budgets.py) gives the same vision tokens; a recipe that cannot
fit is refused at start-up in one line, and the worst case is printed by --cfg job, --dry-run and validate."""

import math

import pytest
import regex
import torch
import yaml
from qwen_vl_utils import vision_process as qvu
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE
from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX as QWEN3_5_PRETOKENIZE
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.cli.main import main
from finetune.recipe import budgets
from finetune.recipe.load import RECIPES_DIR, load_config

GPU_EXPERIMENTS = sorted(p.stem for p in (RECIPES_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("demo"))
PHOTO = (4000, 3000)
SECONDS, FPS = 600, 30
VIDEOS = ((3840, 2160), (1920, 1080))


def _patch_size(family: str) -> int:
    """The family's ViT patch as its published processor sets it (qwen-vl-utils' `image_patch_size`)."""
    return int((FAMILIES[family].processor_settings or {}).get("image_processor", {}).get("patch_size", 14))


def _image_tokens(m, factor: int) -> int:
    """qwen-vl-utils' fetch_image sizing of the photo."""
    width, height = PHOTO
    h, w = qvu.smart_resize(height, width, factor=factor, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
    return (h // factor) * (w // factor)


def _video(m, factor: int, width: int, height: int, family: str) -> tuple[int, int, int, str]:
    """qwen-vl-utils' fetch_video sizing of the video: (vision tokens, text tokens, frames, "WxH" of a frame). The
    per-frame cap is fetch_video's rule (the clip's total_pixels shared by the frames, within [1.05 x min_pixels,
    VIDEO_MAX_TOKEN_NUM tokens], lowered by a max_pixels); the text is what transformers' Qwen3VLProcessor writes
    per frame pair, counted as Qwen's pre-tokenizer splits it."""
    total = SECONDS * FPS
    ele = {
        "fps": m.video_fps,
        "min_frames": m.video_min_frames,
        "max_frames": m.video_max_frames,
        "min_pixels": m.video_min_pixels,
        "max_pixels": m.video_max_pixels,
        "total_pixels": m.video_total_pixels,
    }
    nframes = qvu.smart_nframes(ele, total_frames=total, video_fps=FPS)
    frame_max = qvu.VIDEO_MAX_TOKEN_NUM * factor * factor
    cap = max(min(frame_max, ele["total_pixels"] / nframes * qvu.FRAME_FACTOR), int(ele["min_pixels"] * 1.05))
    cap = min(ele["max_pixels"], cap)
    h, w = qvu.smart_resize(height, width, factor=factor, min_pixels=ele["min_pixels"], max_pixels=cap)
    pairs = math.ceil(nframes / qvu.FRAME_FACTOR)
    vision = pairs * (h // factor) * (w // factor)
    text = 2  # <|vision_start|> <|vision_end|> around the video
    if FAMILIES[family].video_layout == "timestamped_frames":
        indices = torch.linspace(0, total - 1, nframes).round().long().tolist()  # qwen-vl-utils' readers
        stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, FPS, qvu.FRAME_FACTOR)
        pattern = QWEN3_5_PRETOKENIZE if family.startswith("qwen3_5") else QWEN2_PRETOKENIZE
        text += sum(len(regex.findall(pattern, f"<{s:.1f} seconds>")) + 2 for s in stamps)
    return vision, text, nframes, f"{w}x{h}"


@pytest.mark.parametrize("experiment", GPU_EXPERIMENTS)
def test_every_gpu_experiment_fits_its_worst_case_by_qwen_vl_utils(experiment):
    config = load_config([f"experiment={experiment}", "data.train=my.json"])
    m, family = config.model, config.model.family
    factor = _patch_size(family) * qvu.SPATIAL_MERGE_SIZE
    room = config.data.max_length - budgets.CONVERSATION_ALLOWANCE
    ours = {case.item: case for case in budgets.worst_cases(config)}

    image = _image_tokens(m, factor)
    assert image + 2 <= room, (experiment, image)
    assert ours["4000x3000 photo"].vision == image
    for width, height in VIDEOS:
        vision, text, frames, _ = _video(m, factor, width, height, family)
        assert vision + text <= room, (experiment, width, height, vision, text)
        case = ours[f"10-minute {width}x{height} video"]
        assert case.vision == vision
        # ours counts every timestamp at the clip's last second: a bound, at most one token per frame pair above
        assert text <= case.text <= text + math.ceil(frames / 2)


def test_the_conversation_allowance_is_512_tokens_or_an_eighth_of_a_short_row():
    assert budgets.conversation_allowance(16384) == 512 == budgets.CONVERSATION_ALLOWANCE
    assert budgets.conversation_allowance(256) == 32  # the CPU demo's rows


def _expected_refusal(overrides: list[str]) -> str:
    """The one-line refusal, its numbers from qwen-vl-utils' sizing of the 2160p video."""
    config = load_config([o for o in overrides if not o.startswith("data.max_length")])
    m, family = config.model, config.model.family
    factor = _patch_size(family) * qvu.SPATIAL_MERGE_SIZE
    vision, text, frames, size = _video(m, factor, 3840, 2160, family)
    pairs = frames // 2
    assert FAMILIES[family].video_layout == "one_block"  # no timestamps: ours is exact, not a bound
    return (
        f"data.max_length=8192 cannot hold this recipe's worst case: a 10-minute 3840x2160 video plans to "
        f"{vision + text:,} tokens ({frames} frames = {pairs} pairs x {vision // pairs} at {size} px), + 512 for the "
        f"conversation = {vision + text + 512:,}. Samples with such media would stop the run: lower "
        "model.video_total_pixels / model.video_max_frames / model.video_max_pixels, or raise data.max_length (the "
        "worst cases: finetune/recipe/budgets.py)."
    )


def test_a_recipe_that_cannot_fit_is_refused_at_start_up_in_one_line(capsys):
    overrides = ["experiment=qwen2_5_vl_7b_video_lora", "data.train=my.json", "data.max_length=8192"]
    expected = _expected_refusal(overrides)
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert str(info.value) == expected
    assert main([*overrides, "--cfg", "job"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {expected}\n" and captured.out == ""


def test_an_oversized_image_budget_is_refused_naming_max_pixels():
    """The checkpoint's own 16,384-token image cap in a 12,000-token row (the video kept small: only the image fails)."""
    overrides = ["experiment=qwen3_vl_8b_video_lora", "data.train=my.json", "model.max_pixels=16777216"]
    image = _image_tokens(load_config(overrides).model, 32) + 2
    assert image + 512 > 12000
    overrides += ["data.max_length=12000", "model.video_total_pixels=4194304"]
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    message = str(info.value)
    assert f"worst case: a 4000x3000 photo plans to {image:,} tokens (" in message and "video" not in message
    assert "Samples with such media would stop the run: lower model.max_pixels, or raise data.max_length" in message


def test_cfg_job_prints_the_worst_case_as_yaml_comments(capsys):
    overrides = ["experiment=qwen3_vl_8b_video_lora", "data.train=my.json"]
    assert main([*overrides, "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    comments = [line for line in out.splitlines() if line.startswith("#")]
    config = load_config(overrides)
    assert comments == [f"# {line}" for line in budgets.summary_lines(config)]
    assert yaml.safe_load(out)["data"]["max_length"] == config.data.max_length  # still a recipe
    largest = max(case.tokens for case in budgets.worst_cases(config))
    assert f"= {largest + 512:,}: fits data.max_length={config.data.max_length}" in comments[-1]


def test_dry_run_and_validate_print_the_worst_case(capsys, monkeypatch):
    from finetune.runs.launch import run_recipe
    from finetune.training import validate

    config = load_config(["logger=none"])
    lines = budgets.summary_lines(config)
    assert run_recipe(["logger=none"], dry_run=True) == 0
    assert "\n".join(lines) in capsys.readouterr().out

    class Stop(Exception):
        pass

    def no_processor(_):
        raise Stop  # the worst case is printed before the processor loads (for a real model: a download)

    monkeypatch.setattr("finetune.model.load.load_processor", no_processor)
    with pytest.raises(Stop):
        validate.validate(config, ["train"], False, None)
    assert capsys.readouterr().out == "\n".join(lines) + "\n"


@pytest.mark.parametrize("experiment", ["demo", "demo_qwen3_vl", "demo_qwen3_5_moe"])
@pytest.mark.parametrize("max_length", [256, 128])  # the demo's rows, and the rows the scale-out tests train on
def test_the_demos_fit_their_short_rows(experiment, max_length):
    config = load_config([f"experiment={experiment}", f"data.max_length={max_length}"])
    largest = max(case.tokens for case in budgets.worst_cases(config))
    assert largest + budgets.conversation_allowance(max_length) <= max_length
