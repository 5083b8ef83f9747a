"""The frame rate behind Qwen3-VL's `<x.x seconds>` timestamps and Qwen2.5-VL's `second_per_grid_ts` is the one vLLM
reads (docs/fidelity.md, "Frame rate"): the container's average rate, which vLLM's default loader gets from OpenCV
and hands the processor in the video metadata. Checked on media whose rates depend on who reads them (NTSC rates, a
variable rate, a drifting clip, Matroska/WebM) in training, in predict's prompts and in the export's check, against
the processor given that rate (`ffprobe`'s avg_frame_rate, read outside our code)."""

import pytest
import torch
from transformers import AutoProcessor
from transformers.video_utils import VideoMetadata

from finetune.base.families import FAMILIES
from finetune.data.conversation import Sample
from finetune.data.encode import ConversationEncoder
from finetune.data.media import decode_frames, probe_video
from finetune.data.vision import VisionSettings
from tests.helpers.frame_rates import container_fps, torchcodec_fps, write_rate_media

SETTINGS = VisionSettings(
    min_pixels=4096,
    max_pixels=65536,
    video_fps=2.0,
    video_min_frames=4,
    video_max_frames=64,
    video_min_pixels=4096,
    video_max_pixels=16384,
    video_total_pixels=16384 * 64,
)
TIMESTAMPED = [f for f in FAMILIES if FAMILIES[f].video_layout == "timestamped_frames"]
TIMED = [f for f in FAMILIES if FAMILIES[f].video_seconds_scale]


@pytest.fixture(scope="module")
def rate_media(tmp_path_factory):
    return write_rate_media(tmp_path_factory.mktemp("rates"))


def test_the_media_tell_the_rules_apart_and_training_reads_the_container_rate(rate_media):
    differ = []
    for name, path in rate_media.items():
        assert probe_video(path).fps == container_fps(path), name
        if abs(torchcodec_fps(path) - container_fps(path)) > 1e-6:
            differ.append(name)
    # NTSC clips read the same both ways; the variable, drifting and millisecond-timestamp ones do not.
    assert set(differ) == {"variable.mp4", "drift.mp4", "ms_24.mkv", "ms_2997.webm"}, differ


def _sample(path, **options):
    return Sample("r", [{"role": "user", "content": [{"type": "video", "video": path, **options}]}], "rates")


def _served(processor, encoder, sample, fps_of):
    """The processor's own rendering of `sample` given our frames and indices and the metadata a server hands it
    (the frame rate `fps_of(path)`)."""
    frames, metadata = [], []
    for info, plan in encoder.video_plans(sample):
        decoded = torch.from_numpy(decode_frames(info, plan.indices)).permute(0, 3, 1, 2)
        from torchvision.transforms.functional import resize

        frames.append(resize(decoded, [plan.height, plan.width], antialias=True))
        metadata.append(
            VideoMetadata(total_num_frames=info.total_frames, fps=fps_of(info.source), frames_indices=plan.indices)
        )
    text = processor.apply_chat_template(sample.messages, tokenize=False, add_generation_prompt=True)
    return processor(
        text=[text],
        videos=frames,
        video_metadata=metadata,
        videos_kwargs={"do_resize": False, "do_sample_frames": False, "cap_pixels_per_frame": False},
        return_tensors="pt",
    )


def _predict_encoder(processor, family):
    """The encoder predict builds from a recipe (no labels, the family's video layout)."""
    from finetune.recipe.data_settings import conversation_encoder
    from finetune.recipe.load import load_config

    config = load_config([f"model=tiny_{family}"])
    encoder = conversation_encoder(processor, config, for_training=False)
    return ConversationEncoder(processor, SETTINGS, video_layout=encoder.video_layout)


@pytest.mark.parametrize("family", TIMESTAMPED)
def test_qwen3_timestamps_are_the_ones_written_for_the_container_rate(processors, rate_media, family):
    from finetune.evaluation.predict import question_sample

    processor = processors[family]
    training = ConversationEncoder(processor, SETTINGS)
    predict = _predict_encoder(processor, family)
    other = 0
    for name, path in rate_media.items():
        for options in ({}, {"fps": 5.0}, {"nframes": 6}):
            sample = _sample(path, **options)
            served = _served(processor, training, sample, container_fps)["input_ids"][0].tolist()
            ids = training.encode(sample, generation_prompt=True).input_ids
            assert ids == served, (name, options)
            prompt = question_sample("", [], [path], options)
            prompt.messages[0]["content"].pop()  # predict's question text: none here, as in `sample`
            assert predict.encode(prompt, generation_prompt=True).input_ids == served, (name, options)
            by_torchcodec = _served(processor, training, sample, torchcodec_fps)["input_ids"][0].tolist()
            other += by_torchcodec != served
    assert other >= 3  # other timestamps text had the rate been torchcodec's


@pytest.mark.parametrize("family", TIMED)
def test_qwen2_5_second_per_grid_follows_the_container_rate(processors, rate_media, family):
    from finetune.evaluation.predict import question_sample

    processor = processors[family]
    training = ConversationEncoder(processor, SETTINGS)
    predict = _predict_encoder(processor, family)
    other = 0
    for name, path in rate_media.items():
        for options in ({}, {"fps": 5.0}):
            sample = _sample(path, **options)
            served = _served(processor, training, sample, container_fps)["second_per_grid_ts"]
            ours = torch.tensor(training.encode(sample).second_per_grid_ts, dtype=torch.float32)
            assert torch.equal(ours, served), (name, options, ours, served)
            prompt = question_sample("", [], [path], options)
            prompt.messages[0]["content"].pop()
            asked = predict.encode(prompt, generation_prompt=True).second_per_grid_ts
            assert torch.equal(torch.tensor(asked, dtype=torch.float32), served), (name, options)
            other += not torch.equal(_served(processor, training, sample, torchcodec_fps)["second_per_grid_ts"], served)
    assert other >= 3


def test_the_export_check_uses_the_trained_rate_and_names_the_videos_transformers_reads_otherwise(
    tmp_path, tiny_paths, processors, rate_media
):
    """The export's reload check: the videos whose rate transformers' own loader reads otherwise are listed, and
    given to the exported processor as frames with the trained metadata, so its sampled fps (hence
    second_per_grid_ts) is training's; the model card names them and says how to serve them identically."""
    from finetune.exporting.serving import apply_budgets, model_card, save_processor
    from finetune.exporting.videos import frames_for_transformers, rate_differences
    from finetune.recipe.data_settings import vision_settings
    from finetune.recipe.load import load_config

    config = load_config(["experiment=demo", "model=tiny_qwen2_5_vl"])
    exported = AutoProcessor.from_pretrained(tiny_paths["qwen2_5_vl"])
    apply_budgets(exported, config.model)
    save_processor(exported, tmp_path)
    paths = list(rate_media.values())
    differences = rate_differences(paths)
    assert {d["path"] for d in differences} == {p for p in paths if abs(torchcodec_fps(p) - container_fps(p)) > 1e-6}
    for d in differences:
        assert (d["trained_fps"], d["transformers_fps"]) == (container_fps(d["path"]), torchcodec_fps(d["path"]))
    frames, entries = frames_for_transformers(tmp_path, [d["path"] for d in differences])
    served = AutoProcessor.from_pretrained(tmp_path)
    encoder = ConversationEncoder(processors["qwen2_5_vl"], vision_settings(config))
    for entry in entries:
        out = served.video_processor(  # the reload script's call (finetune/exporting/export.py)
            videos=[frames[entry["frames"]]],
            video_metadata=[entry["metadata"]],
            do_sample_frames=False,
            return_metadata=True,
        )
        ((_, plan),) = encoder.video_plans(_sample(entry["path"]))
        assert out["video_metadata"][0].fps == container_fps(entry["path"])
        assert out["video_metadata"][0].sampled_fps == pytest.approx(plan.sampled_fps, rel=1e-9), entry["path"]
        assert out["video_grid_thw"][0].tolist() == list(plan.grid)
    card = model_card(config, {"served_grids": {"checked": len(paths), "other_frame_rate": differences}})
    assert f"{len(differences)} checked videos render differently" in card
    assert all(f"`{d['path'].rsplit('/', 1)[-1]}`" in card for d in differences) and "video_metadata" in card
