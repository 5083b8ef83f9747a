"""Serve what was trained: the processor an export carries gives plain transformers the training grids.

Media of several sizes, lengths (1-60 s), frame rates and containers (mp4, avi, mkv, webm, mov) go through our
training encoder and through `AutoProcessor.from_pretrained(<folder>)` of transformers alone, for the demo
recipe and for a recipe with other budgets (a binding total pixel budget included). The folder is written by
the export's own functions; tests/integration/test_export.py does the same on a real merged export.
"""

import json
import math
import random
from pathlib import Path

import pytest
from transformers import AutoProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize as transformers_smart_resize

from finetune.base.families import FAMILIES
from finetune.data.encode import ConversationEncoder
from finetune.data.media import probe_video
from finetune.data.vision import FRAME_FACTOR, smart_resize
from finetune.exporting.serving import TOKEN_PIXELS, apply_budgets, max_video_tokens, save_processor
from finetune.exporting.videos import frames_for_transformers, rate_differences, transformers_decodes_video_files
from finetune.recipe.data_settings import vision_settings
from finetune.recipe.load import load_config
from tests.helpers.serving_media import OTHER_BUDGETS, assert_same_grids, served_grids, trained_grids, write_media

RECIPES = {"demo": ["experiment=demo"], "budgets": ["experiment=demo", *OTHER_BUDGETS]}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return write_media(tmp_path_factory.mktemp("serving_media"))


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_processor_gives_the_training_grids(tmp_path, tiny_paths, processors, media, recipe, family):
    images, videos = media
    config = load_config([*RECIPES[recipe], f"model=tiny_{family}"])  # the budgets in the family's own terms
    encoder = ConversationEncoder(processors[family], vision_settings(config))

    exported = AutoProcessor.from_pretrained(tiny_paths[family])
    apply_budgets(exported, config.model)
    save_processor(exported, tmp_path)
    trained = trained_grids(encoder, images, videos)
    served = served_grids(tmp_path, images, videos)  # plain transformers, nothing of ours
    # Matroska's millisecond timestamps: transformers' loader (torchcodec) reads another frame rate than the container's
    # (training's, vLLM's); the export lists such videos and checks them on their frames (test_frame_rates.py).
    other_rate = {d["path"] for d in rate_differences([str(v) for v in videos])}
    assert other_rate and all(Path(p).suffix in (".mkv", ".webm") for p in other_rate), other_rate
    assert all(served[1][i][3] != trained[1][i][3] for i, v in enumerate(videos) if str(v) in other_rate)
    same = [i for i, v in enumerate(videos) if str(v) not in other_rate]  # the videos served with the trained grid
    if FAMILIES[family].video_budget == "clip":
        same = _videos_served_as_trained(encoder, config.model, videos, trained, served, other_rate)
    assert_same_grids((trained[0], [trained[1][i] for i in same]), (served[0], [served[1][i] for i in same]))
    served = AutoProcessor.from_pretrained(tmp_path)
    # The whole processor call (text + media) agrees too, second_per_grid_ts included.
    text = "<|vision_start|><|video_pad|><|vision_end|>What happens?"
    checked = next(i for i in same if i > 0)
    call = served(text=[text], videos=[str(videos[checked])], return_tensors="pt")
    assert call["video_grid_thw"][0].tolist() == trained[1][checked][:3]
    if FAMILIES[family].video_seconds_scale:
        assert call["second_per_grid_ts"][0].item() == pytest.approx(FRAME_FACTOR / trained[1][checked][3], rel=1e-6)


def _videos_served_as_trained(encoder, model_cfg, videos, trained, served, other_rate) -> list[int]:
    """The two documented differences of Qwen3VLVideoProcessor (finetune/exporting/serving.py, SERVING_DIFFERENCES),
    each checked exactly where it applies: it samples int(frames / fps x fps) frames and pads an odd count with the
    last frame where qwen-vl-utils (and this training) floors the count to pairs; and it applies the minimum size to
    the whole clip where training applies it to each frame. The other videos must match exactly."""
    from finetune.data.conversation import Sample

    same = []
    odd = small = 0
    for index, (path, want, got) in enumerate(zip(videos, trained[1], served[1])):
        if str(path) in other_rate:
            continue  # read at another frame rate by transformers (see the caller)
        sample = Sample("s", [{"role": "user", "content": [{"type": "video", "video": str(path)}]}], "test")
        ((info, plan),) = encoder.video_plans(sample)
        count = min(max(int(info.total_frames / info.fps * model_cfg.video_fps), 4), model_cfg.video_max_frames)
        count = min(count, info.total_frames)
        if count % 2 and count != len(plan.indices):
            assert len(plan.indices) == count - 1 and got[0] == math.ceil(count / 2), (path, want, got, count)
            odd += 1
            continue
        patch = plan.patch
        if got[:3] != want[:3] and got[0] == want[0]:
            # Frames under the per-frame minimum: training scales them up to it (qwen-vl-utils); the Qwen3 processor
            # holds the whole clip to shortest_edge, so they stay smaller when served.
            served_frame, trained_frame = got[1] * got[2] * patch**2, want[1] * want[2] * patch**2
            assert served_frame < model_cfg.video_min_pixels <= trained_frame, (path, want, got)
            assert got[0] * 2 * served_frame >= model_cfg.video_min_pixels, (path, want, got)
            small += 1
            continue
        same.append(index)
    assert odd + small + len(other_rate) < len(videos) - 1  # most clips still compare exactly
    return same


def test_legacy_processor_files_hold_the_budgets(tmp_path, tiny_paths):
    config = load_config(RECIPES["budgets"])
    processor = AutoProcessor.from_pretrained(tiny_paths["qwen2_5_vl"])
    apply_budgets(processor, config.model)
    save_processor(processor, tmp_path)
    image = json.loads((tmp_path / "preprocessor_config.json").read_text())
    video = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    m = config.model
    assert (image["min_pixels"], image["max_pixels"]) == (m.min_pixels, m.max_pixels)
    assert image["size"] == {"shortest_edge": m.min_pixels, "longest_edge": m.max_pixels}
    assert (video["min_pixels"], video["max_pixels"]) == (m.video_min_pixels, m.video_max_pixels)
    assert video["do_sample_frames"] is True and video["fps"] == m.video_fps and video["cap_pixels_per_frame"] is True
    assert video["min_frames"] == 4 and video["max_frames"] == m.video_max_frames  # 3 rounds up to pairs of frames
    assert int(video["max_video_tokens"] * TOKEN_PIXELS) == m.video_total_pixels  # 882000 is expressible exactly
    nested = json.loads((tmp_path / "processor_config.json").read_text())
    assert nested["video_processor"]["size"] == video["size"] and nested["image_processor"]["size"] == image["size"]


def test_the_total_budget_rounding_difference_is_rare_and_small():
    """transformers expresses the total video budget as int(max_video_tokens * 705.6) pixels and divides with //;
    qwen-vl-utils uses the float budget. For a budget not of that form (1024 * 784 here), count how often the
    per-frame size differs over many frame sizes and counts (documented in finetune/exporting/serving.py)."""
    total, lo, hi = 1024 * 784, 16 * 784, 128 * 784
    served_total = int(max_video_tokens(total) * 28 * 28 * 0.9)
    rng, differ, cases = random.Random(0), 0, 4000
    for _ in range(cases):
        h, n = rng.randint(60, 2000), 2 * rng.randint(2, 64)
        w = int(h * rng.uniform(0.25, 4))
        ours = smart_resize(h, w, lo, max(min(hi, total / n * FRAME_FACTOR), int(lo * 1.05)))
        theirs = transformers_smart_resize(
            h, w, factor=28, min_pixels=lo, max_pixels=max(min(hi, served_total * 2 // n), int(lo * 1.05))
        )
        differ += ours != tuple(theirs)
    print(f"total budget {total} served as {served_total}: {differ} of {cases} frame sizes differ")
    assert served_total != total and differ / cases < 0.02
    assert math.isclose(served_total, total, rel_tol=1e-3)


@pytest.mark.skipif(
    not transformers_decodes_video_files(),
    reason="needs transformers to decode video files itself (torchcodec with FFmpeg) to compare with",
)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_frames_we_decode_stand_in_for_the_file_where_transformers_cannot_decode(
    tmp_path, tiny_paths, media, recipe, monkeypatch
):
    """What the export's reload check gives the exported processor where torchcodec cannot load (our probe's metadata,
    the frames its own sample_frames picks, decoded by PyAV) gives what it gives the file: same grids, sampled fps,
    frame indices and pixels, for every container."""
    import finetune.data.media as our_media

    _, videos = media
    exported = AutoProcessor.from_pretrained(tiny_paths["qwen2_5_vl"])
    apply_budgets(exported, load_config(RECIPES[recipe]).model)
    save_processor(exported, tmp_path)
    served = AutoProcessor.from_pretrained(tmp_path).video_processor
    monkeypatch.setattr(our_media, "_backend", "pyav")  # decoded by PyAV, as where torchcodec cannot load
    frames, entries = frames_for_transformers(tmp_path, [str(v) for v in videos])
    other_rate = {d["path"]: d for d in rate_differences([str(v) for v in videos])}
    for entry in entries:
        from_file = served(videos=[entry["path"]], return_metadata=True, return_tensors="pt")
        if entry["path"] in other_rate:  # transformers reads another rate from the file: the frames carry training's
            read = other_rate[entry["path"]]
            assert entry["metadata"]["fps"] == read["trained_fps"] == probe_video(entry["path"]).fps
            assert from_file["video_metadata"][0].fps == read["transformers_fps"]
            continue
        from_frames = served(  # the reload script's call (finetune/exporting/export.py)
            videos=[frames[entry["frames"]]],
            video_metadata=[entry["metadata"]],
            do_sample_frames=False,
            return_metadata=True,
            return_tensors="pt",
        )
        file_metadata, frames_metadata = from_file["video_metadata"][0], from_frames["video_metadata"][0]
        assert from_frames["video_grid_thw"].tolist() == from_file["video_grid_thw"].tolist(), entry["path"]
        assert list(frames_metadata.frames_indices) == list(file_metadata.frames_indices), entry["path"]
        assert frames_metadata.sampled_fps == pytest.approx(file_metadata.sampled_fps, rel=1e-9), entry["path"]
        assert frames_metadata.total_num_frames == file_metadata.total_num_frames, entry["path"]
        difference = (from_frames["pixel_values_videos"] - from_file["pixel_values_videos"]).abs().max().item()
        assert difference <= 1e-5, (entry["path"], difference)  # PyAV's frames are torchcodec's
