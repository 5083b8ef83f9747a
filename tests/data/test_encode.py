"""Our encoding equals the real processor's, and only assistant replies are trained on."""

import pytest
import torch
from media_factory import write_dataset, write_image, write_video
from transformers.video_utils import VideoMetadata

from finetune.data.conversation import DataError, Sample, load_samples
from finetune.data.encode import IGNORE_INDEX, ConversationEncoder, VisionSettings
from finetune.data.media import VideoSettings, load_image, load_video

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def _settings(**kw):
    values = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, video_min_pixels=56 * 56,
                  video_max_pixels=28 * 28 * 32, video_total_pixels=28 * 28 * 200, video=VideoSettings(2.0, 4, 16))
    values.update(kw)
    return VisionSettings(**values)


def _reference(processor, sample, vision):
    """What transformers' processor gives for the same conversation, frames and metadata."""
    text = processor.apply_chat_template(sample.messages, tokenize=False)
    images = [load_image(b["image"]) for b in sample.media("image")] or None
    videos = [load_video(b["video"], vision.video) for b in sample.media("video")]
    kwargs = {"images": images, "images_kwargs": {"size": {"shortest_edge": vision.min_pixels, "longest_edge": vision.max_pixels}}}
    if videos:
        # qwen-vl-utils' per-frame cap from the total budget: the processor gets it as its size bound.
        caps = {vision.video_frame_max_pixels(len(v.indices)) for v in videos}
        assert len(caps) == 1
        kwargs.update(
            videos=[v.frames for v in videos],
            video_metadata=[VideoMetadata(total_num_frames=v.total_frames, fps=v.fps, frames_indices=v.indices) for v in videos],
            videos_kwargs={"size": {"shortest_edge": vision.video_min_pixels, "longest_edge": caps.pop()},
                           "do_sample_frames": False, "cap_pixels_per_frame": False},
        )
    return processor(text=[text], return_tensors="pt", **kwargs)


@pytest.fixture(scope="module")
def mixed_samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    records = []
    sizes = [(56, 56), (97, 61), (300, 200), (23, 150), (640, 360)]
    for i, (w, h) in enumerate(sizes):
        write_image(root / f"i{i}.png", w, h, seed=i)
        write_video(root / f"v{i}.mp4", frames=6 + 5 * i, fps=[4, 10, 24, 30, 12][i], width=w - w % 2, height=h - h % 2, seed=i)
        records.append({"id": f"m{i}", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Look <image> then <video> ({i})"},
            {"role": "assistant", "content": "Seen."},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": f"Yes, {i} times."},
        ], "images": [f"i{i}.png"], "videos": [f"v{i}.mp4"]})
        records.append({"id": f"t{i}", "messages": [{"role": "user", "content": "Text only?"}, {"role": "assistant", "content": "Yes."}]})
    return load_samples(write_dataset(root / "d.json", records))


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_the_transformers_processor(processors, mixed_samples, family):
    processor, vision = processors[family], _settings()
    encoder = ConversationEncoder(processor, vision)
    for sample in mixed_samples:
        ours, ref = encoder.encode(sample), _reference(processor, sample, vision)
        assert ours.input_ids == ref["input_ids"][0].tolist(), sample.id
        assert ours.mm_token_type_ids == ref["mm_token_type_ids"][0].tolist(), sample.id
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if key in ref:
                assert torch.equal(getattr(ours, key), ref[key]), (sample.id, key)
            else:
                assert getattr(ours, key) is None
        if family == "qwen2_5_vl" and "second_per_grid_ts" in ref:
            assert ours.second_per_grid_ts == pytest.approx(ref["second_per_grid_ts"].tolist(), abs=1e-6)
        assert family == "qwen2_5_vl" or ours.second_per_grid_ts is None


def test_second_per_grid_ts_uses_the_real_fps(processors, mixed_samples):
    encoder = ConversationEncoder(processors["qwen2_5_vl"], _settings())
    sample = next(s for s in mixed_samples if s.id == "m2")  # 16 frames at 24 fps, sampled at 2 fps
    video = load_video(sample.media("video")[0]["video"], encoder.vision.video)
    assert video.fps == 24 and video.total_frames == 16
    assert encoder.encode(sample).second_per_grid_ts == [pytest.approx(2 / video.sampled_fps)]
    assert video.sampled_fps != 24  # never the 24-fps default guess


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_the_assistant_replies(processors, mixed_samples, family):
    processor = processors[family]
    sample = mixed_samples[0]
    decode = processor.tokenizer.decode
    for mode, expected in [("assistant", ["Seen.<|im_end|>", "Yes, 0 times.<|im_end|>"]), ("last_assistant", ["Yes, 0 times.<|im_end|>"])]:
        encoded = ConversationEncoder(processor, _settings(), label_mode=mode).encode(sample)
        spans, current = [], []
        for token, label in zip(encoded.input_ids, encoded.labels):
            if label == IGNORE_INDEX:
                if current:
                    spans.append(current)
                current = []
            else:
                assert label == token
                current.append(token)
        spans += [current] if current else []
        assert [decode(s) for s in spans] == expected, mode
    everything = ConversationEncoder(processor, _settings(), label_mode="all").encode(sample)
    pads = {processor.image_token_id, processor.video_token_id}
    assert all((lab == IGNORE_INDEX) == (tok in pads) for tok, lab in zip(everything.input_ids, everything.labels))


def test_too_long_sample_is_refused_not_truncated(processors, mixed_samples):
    encoder = ConversationEncoder(processors["qwen2_5_vl"], _settings(), max_length=20)
    with pytest.raises(DataError, match=r"\(id m0\): \d+ tokens, more than data.max_length=20. Nothing is truncated"):
        encoder.encode(mixed_samples[0])


def test_empty_assistant_turn_is_refused(processors):
    sample = Sample("e", [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": ""}]}], "x.json[0]")
    with pytest.raises(DataError, match="assistant turn 1 is empty"):
        ConversationEncoder(processors["qwen2_vl"], _settings()).encode(sample)


def test_generation_prompt_ends_with_the_assistant_header(processors, mixed_samples):
    processor = processors["qwen2_vl"]
    sample = mixed_samples[1]
    prompt = Sample(sample.id, sample.messages[:-1], sample.source)
    encoded = ConversationEncoder(processor, _settings()).encode(prompt, generation_prompt=True)
    assert processor.tokenizer.decode(encoded.input_ids).endswith("<|im_start|>assistant\n")
    assert all(label == IGNORE_INDEX for label in encoded.labels)


def test_video_frame_budget_follows_qwen_vl_utils():
    import qwen_vl_utils.vision_process as ref

    vision = _settings(video_min_pixels=128 * 28 * 28, video_max_pixels=768 * 28 * 28, video_total_pixels=int(128000 * 28 * 28 * 0.9))
    for nframes in (2, 4, 16, 64, 200, 768):
        expected = max(min(ref.VIDEO_MAX_TOKEN_NUM * 28 * 28, vision.video_total_pixels / nframes * ref.FRAME_FACTOR),
                       int(ref.VIDEO_MIN_TOKEN_NUM * 28 * 28 * 1.05))
        assert vision.video_frame_max_pixels(nframes) == int(expected)
