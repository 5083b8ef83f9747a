"""Our encoding equals the reference flow (qwen-vl-utils' process_vision_info + the transformers processor) on
hundreds of random samples for every model family (Qwen3-VL: qwen-vl-utils at `image_patch_size=16`, its timestamps
written by transformers' Qwen3VLProcessor; videos read at the container's frame rate, as vLLM reads them), and the metadata-only pre-pass counts exactly its tokens. Qwen3-VL's
rendering also equals the processor's on real media (the demo's and other containers, frame rates and lengths), fed
the same frames and metadata. Labels cover exactly the assistant replies."""

import dataclasses
import random

import pytest
import torch
from qwen_vl_utils import process_vision_info
from transformers.video_utils import VideoMetadata

from finetune.base.errors import DataError
from finetune.base.families import FAMILIES
from finetune.data.conversation import Sample
from finetune.data.encode import IGNORE_INDEX, ConversationEncoder
from finetune.data.sources import load_samples
from finetune.data.vision import VisionSettings
from finetune.recipe.data_settings import vision_settings
from tests.helpers.frame_rates import torchcodec_reads_the_container_rate
from tests.helpers.media_factory import write_dataset
from tests.helpers.random_data import build_media_pool, random_record

N_SAMPLES = 300  # per family: 291 compared, 205 videos among them, 9 refused by the reference (seed 1)
# video_max_pixels is qwen-vl-utils' fixed VIDEO_MAX_TOKEN_NUM (768 tokens): the reference has no knob for it.
# (Its pixels depend on the patch size: `settings_for` gives a family's.)
SETTINGS = VisionSettings(
    min_pixels=4 * 784,
    max_pixels=256 * 784,
    video_fps=2.0,
    video_min_frames=4,
    video_max_frames=64,
    video_min_pixels=16 * 784,
    video_max_pixels=768 * 784,
    video_total_pixels=4096 * 784,
)


def patch_of(processor) -> int:
    return processor.image_processor.patch_size


def settings_for(processor) -> VisionSettings:
    """SETTINGS with qwen-vl-utils' fixed 768 tokens per frame at the processor's factor (28 or 32)."""
    factor = patch_of(processor) * processor.image_processor.merge_size
    return dataclasses.replace(SETTINGS, video_max_pixels=768 * factor * factor)


@pytest.fixture(scope="module")
def media_pool(tmp_path_factory):
    return build_media_pool(tmp_path_factory.mktemp("pool"))


@pytest.fixture(scope="module")
def random_samples(media_pool):
    root, images, videos = media_pool
    rng = random.Random(1)
    records = [random_record(rng, images, videos, i) for i in range(N_SAMPLES)]
    return load_samples(write_dataset(root / "random.json", records))


# qwen-vl-utils' output for the current patch size, per sample: families with one patch size (Qwen2/2.5-VL: 14,
# Qwen3-VL/3.5 and their MoE: 16) get the same items and options, so it reads and resizes each sample's media once
# per patch size rather than once per family (~10 s of each family's ~30 s); the processors still run per family.
_VISION_INFO: dict = {}


def _vision_info(content, patch, sample_id):
    if _VISION_INFO.get("patch") != patch:
        _VISION_INFO.clear()
        _VISION_INFO["patch"] = patch
    key = (sample_id, repr(content))
    if key not in _VISION_INFO:
        try:
            with torchcodec_reads_the_container_rate():  # the frame rate vLLM reads (docs/fidelity.md, "Frame rate")
                images, videos, _ = process_vision_info(
                    [{"role": "user", "content": content}],
                    return_video_kwargs=True,
                    return_video_metadata=True,
                    image_patch_size=patch,
                )
            _VISION_INFO[key] = (images, videos)
        except Exception as err:  # refused: refused again for the next family, as the reference would
            _VISION_INFO[key] = err
    cached = _VISION_INFO[key]
    if isinstance(cached, Exception):
        raise cached
    images, videos = cached  # copies: a processor must not see what another family's processor did to them
    return (
        None if images is None else [image.copy() for image in images],
        None if videos is None else [(video.clone(), dict(metadata)) for video, metadata in videos],
    )


def _reference(processor, sample):
    """What Qwen's own recipe produces: process_vision_info on the same items and options (at the checkpoint's patch
    size, as Qwen3-VL's model card calls it), then the processor."""
    settings = settings_for(processor)
    content = []
    for message in sample.messages:
        for block in message["content"]:
            if block["type"] == "image":
                spec = settings.image_spec(block)
                content.append({"image": block["image"], "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels})
            elif block["type"] == "video":
                spec = settings.video_spec(block)
                item = {
                    "video": block["video"],
                    "min_pixels": spec.min_pixels,
                    "total_pixels": spec.total_pixels,
                    "min_frames": spec.min_frames,
                    "max_frames": spec.max_frames,
                }
                item.update({"nframes": spec.nframes} if spec.nframes is not None else {"fps": spec.fps})
                item.update({k: block[k] for k in ("max_pixels", "video_start", "video_end") if k in block})
                content.append(item)
    images, videos = _vision_info(content, patch_of(processor), sample.id)
    kwargs = {"images": images, "images_kwargs": {"do_resize": False}}
    if videos:
        kwargs.update(
            videos=[v for v, _ in videos],
            video_metadata=[VideoMetadata(**m) for _, m in videos],
            videos_kwargs={"do_resize": False, "do_sample_frames": False},
        )
    text = processor.apply_chat_template(sample.messages, tokenize=False)
    return processor(text=[text], return_tensors="pt", **kwargs)


def _torchcodec_works(path) -> bool:
    try:
        from torchcodec.decoders import VideoDecoder

        VideoDecoder(path)
        return True
    except Exception:
        return False


def trained_spans(input_ids, labels) -> list[list[int]]:
    """The runs of trained tokens (each label equal to its token), in order."""
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            spans, current = spans + ([current] if current else []), []
        else:
            assert label == token
            current.append(token)
    return spans + ([current] if current else [])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_qwen_vl_utils_and_the_processor_on_random_samples(processors, media_pool, random_samples, family):
    root, _, videos = media_pool
    if not _torchcodec_works(str(root / videos[0])):
        pytest.fail(
            "qwen-vl-utils reads videos with torchcodec, which needs the system FFmpeg libraries "
            "(./launch.sh installs them with apt-get; or install ffmpeg by hand)"
        )
    processor = processors[family]
    encoder = ConversationEncoder(processor, settings_for(processor))
    compared = refused = videos_seen = videos_compared = 0
    for sample in random_samples:
        try:
            ref = _reference(processor, sample)
        except (ValueError, AssertionError, AttributeError) as err:  # qwen-vl-utils refuses it (no frames, ...)
            # On a refused video it retries with torchvision's read_video, gone from torchvision 0.29.
            assert not isinstance(err, AttributeError) or isinstance(err.__context__, ValueError), err
            with pytest.raises(DataError):
                encoder.count_tokens(sample)
            with pytest.raises(DataError):
                encoder.encode(sample)
            refused += 1
            continue
        ours = encoder.encode(sample)
        assert ours.input_ids == ref["input_ids"][0].tolist(), sample.id
        assert ours.mm_token_type_ids == ref["mm_token_type_ids"][0].tolist(), sample.id
        for key in ("image_grid_thw", "video_grid_thw", "pixel_values", "pixel_values_videos"):
            if key in ref:
                assert torch.equal(getattr(ours, key), ref[key]), (sample.id, key)
            else:
                assert getattr(ours, key) is None, (sample.id, key)
        if FAMILIES[family].video_seconds_scale and "second_per_grid_ts" in ref:
            # The processor stores it as float32; the collator does too.
            assert torch.equal(torch.tensor(ours.second_per_grid_ts, dtype=torch.float32), ref["second_per_grid_ts"]), (
                sample.id
            )
            videos_seen += len(ours.second_per_grid_ts)
        assert encoder.count_tokens(sample).total == len(ours.input_ids), sample.id
        compared += 1
        videos_compared += 0 if ours.video_grid_thw is None else len(ours.video_grid_thw)
    assert compared >= N_SAMPLES * 0.8 and refused > 0 and videos_compared > 100
    assert not FAMILIES[family].video_seconds_scale or videos_seen > 100


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_cover_exactly_the_assistant_replies(processors, random_samples, family):
    processor, decode = processors[family], processors[family].tokenizer.decode
    sample = Sample(
        "m",
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Look"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Seen."}]},
            {"role": "user", "content": [{"type": "text", "text": "Again?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes, 0 times."}]},
        ],
        "x.json[0]",
    )
    for mode, expected in [
        ("assistant", ["Seen.<|im_end|>", "Yes, 0 times.<|im_end|>"]),
        ("last_assistant", ["Yes, 0 times.<|im_end|>"]),
    ]:
        encoded = ConversationEncoder(processor, SETTINGS, label_mode=mode).encode(sample)
        assert [decode(s) for s in trained_spans(encoded.input_ids, encoded.labels)] == expected, mode
    with_media = next(s for s in random_samples if s.media("image") and s.media("video"))
    everything = ConversationEncoder(processor, SETTINGS, label_mode="all").encode(with_media)
    # Untrained: what stands inside a vision block: the pads and, where videos are timestamped frames (Qwen3-VL),
    # each frame's timestamp and its inner <|vision_start|> ... <|vision_end|>. The template's markers are text.
    start, end = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    depth, inside = 0, []
    for tok in everything.input_ids:
        depth -= tok == end
        inside.append(depth > 0)
        depth += tok == start
    assert depth == 0
    assert all((lab == IGNORE_INDEX) == within for within, lab in zip(inside, everything.labels))
    pads = {processor.image_token_id, processor.video_token_id}
    assert all(within for tok, within in zip(everything.input_ids, inside) if tok in pads)
    timestamped = FAMILIES[family].video_layout == "timestamped_frames"
    assert (sum(inside) > sum(tok in pads for tok in everything.input_ids)) == timestamped


def test_too_long_sample_is_refused_not_truncated(processors, random_samples):
    encoder = ConversationEncoder(processors["qwen2_5_vl"], SETTINGS, max_length=20)
    sample = next(s for s in random_samples if s.media("video"))
    with pytest.raises(DataError, match=r"\d+ tokens, \d+ more than data.max_length=20. Nothing is truncated") as info:
        encoder.encode(sample)
    assert info.value.kind == "too_long"


def test_empty_assistant_turn_is_refused(processors):
    sample = Sample(
        "e",
        [
            {"role": "user", "content": [{"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": ""}]},
        ],
        "x.json[0]",
    )
    with pytest.raises(DataError, match="assistant turn 1 is empty") as info:
        ConversationEncoder(processors["qwen2_vl"], SETTINGS).encode(sample)
    assert info.value.kind == "empty_turn"


def test_generation_prompt_ends_with_the_assistant_header(processors, random_samples):
    processor = processors["qwen2_vl"]
    sample = next(s for s in random_samples if sum(m["role"] == "assistant" for m in s.messages) == 1)
    prompt = Sample(sample.id, sample.messages[:-1], sample.source)
    encoded = ConversationEncoder(processor, SETTINGS).encode(prompt, generation_prompt=True)
    assert processor.tokenizer.decode(encoded.input_ids).endswith("<|im_start|>assistant\n")
    assert all(label == IGNORE_INDEX for label in encoded.labels)


def test_demo_pre_pass_equals_encoding(processors, demo_config):
    from tests.helpers import DEMO

    encoder = ConversationEncoder(processors["qwen2_5_vl"], vision_settings(demo_config))
    for sample in load_samples(DEMO / "test.json")[:40]:
        assert encoder.count_tokens(sample).total == len(encoder.encode(sample).input_ids)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_render_segments_equal_the_turn_by_turn_renders(processors, random_samples, family):
    """The linear route (one render, replies located by markers) gives the very pieces of the quadratic one (every
    turn rendered as a continuation of the turns before it), for every label mode, with and without a prompt. Qwen's
    templates write replies verbatim (probed once), so a conversation is rendered once."""
    checked = 0
    for mode in ("assistant", "last_assistant", "all"):
        encoder = ConversationEncoder(processors[family], SETTINGS, label_mode=mode)
        assert encoder._template_keeps_replies()
        for sample in random_samples[:150]:
            replies = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"]
            trained = set(replies[-1:] if mode == "last_assistant" else replies)
            prompt = Sample(sample.id, sample.messages[: replies[-1]], sample.source)
            for s, turns, gen in ((sample, replies, False), (prompt, replies[:-1], True)):
                marked = encoder._segments_by_markers(s, turns, trained & set(turns), gen)
                assert marked is not None
                assert marked == encoder._segments_turn_by_turn(s, turns, trained & set(turns), gen)
                checked += len(turns) > 1
    assert checked > 100  # multi-turn samples were among them


def test_a_template_that_rewrites_replies_falls_back_to_turn_by_turn(processors):
    """A template that trims replies cannot be located by markers: the encoder renders turn by turn instead and
    trains on exactly what that template writes."""
    import copy

    processor = copy.deepcopy(processors["qwen2_vl"])
    processor.chat_template = processor.chat_template.replace("{{ content['text'] }}", "{{ content['text'] | trim }}")
    encoder = ConversationEncoder(processor, SETTINGS)
    sample = Sample(
        "t",
        [
            {"role": "user", "content": [{"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "  padded reply  "}]},
        ],
        "x[0]",
    )
    assert not encoder._template_keeps_replies()  # so every conversation's layout is checked
    assert encoder._segments_by_markers(sample, [1], {1}, False) is None
    assert ("padded reply<|im_end|>", True) in encoder.segments(sample)


# ---------------------------------------------------------------- Qwen3-VL: the rendering is the processor's
TIMESTAMPED = [f for f in FAMILIES if FAMILIES[f].video_layout == "timestamped_frames"]
# The Qwen3-VL recipes' video budgets (the checkpoints' own); images up to 256 tokens to keep the test fast.
QWEN3_SETTINGS = VisionSettings(
    min_pixels=64 * 1024,
    max_pixels=256 * 1024,
    video_fps=2.0,
    video_min_frames=4,
    video_max_frames=768,
    video_min_pixels=4096,
    video_max_pixels=768 * 1024,
    video_total_pixels=12288 * 1024,
)


def _user(*blocks, question="What happens?"):
    return [
        {"role": "user", "content": [*blocks, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The dot moves."}]},
    ]


@pytest.fixture(scope="module")
def real_media_samples(tmp_path_factory):
    """The demo's own samples (20 images, 20 videos) and generated media of other containers (mp4, avi, mkv, webm,
    mov), frame rates (4 ... 30000/1001 fps) and lengths (1 ... 60 s): alone, in windows, with nframes, several in
    one sample with text between and after, and a frame folder."""
    from tests.helpers import DEMO
    from tests.helpers.media_factory import write_frame_folder
    from tests.helpers.serving_media import write_media

    demo = load_samples(DEMO / "test.json")
    samples = [s for s in demo if s.media("image")][:20] + [s for s in demo if s.media("video")][:20]
    root = tmp_path_factory.mktemp("real")
    images, videos = write_media(root)

    def add(name, *blocks):
        samples.append(Sample(name, _user(*blocks), f"generated {name}"))

    def image(p):
        return {"type": "image", "image": str(p)}

    def video(p, **options):
        return {"type": "video", "video": str(p), **options}

    for p in images:
        add(p.name, image(p))
    for p in videos:
        add(p.name, video(p))
        add(f"{p.name} 2 frames", video(p, nframes=2))
        add(f"{p.name} 1 fps", video(p, fps=1.0, min_frames=2))
    add("window", video(videos[1], video_start=1.3, video_end=3.7))
    add("late window", video(videos[4], video_start=41.0, video_end=59.5, fps=0.5))
    add("two videos and an image", video(videos[0]), image(images[0]), video(videos[3], nframes=6))
    folder = write_frame_folder(root / "frames", frames=9, width=120, height=80)
    add("frame folder", video(folder, frames_fps=3.0))
    return samples


def _processor_reference(encoder, sample):
    """Qwen3VLProcessor on the same rendered text, the same (already sized) images and frames, and each video's
    metadata: its fps and the sampled frame indices, from which the processor writes the timestamps."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    from finetune.data.media import decode_frames, load_image

    images = [
        load_image(p.path, target=(p.height, p.width)).resize((p.width, p.height), 3)  # PIL bicubic, as encode
        for p in encoder.image_plans(sample)
    ]
    frames, metadata = [], []
    for info, plan in encoder.video_plans(sample):
        decoded = torch.from_numpy(decode_frames(info, plan.indices)).permute(0, 3, 1, 2)
        frames.append(
            resize(decoded, [plan.height, plan.width], interpolation=InterpolationMode.BICUBIC, antialias=True)
        )
        metadata.append(VideoMetadata(total_num_frames=info.total_frames, fps=info.fps, frames_indices=plan.indices))
    kwargs = {"images": images or None, "images_kwargs": {"do_resize": False}}
    if frames:
        kwargs.update(
            videos=frames,
            video_metadata=metadata,
            videos_kwargs={"do_resize": False, "do_sample_frames": False, "cap_pixels_per_frame": False},
        )
    text = encoder.processor.apply_chat_template(sample.messages, tokenize=False)
    return encoder.processor(text=[text], return_tensors="pt", **kwargs)


@pytest.mark.parametrize("family", TIMESTAMPED)
def test_qwen3_rendering_equals_the_processor_on_real_media(processors, real_media_samples, family):
    """Token ids (timestamps, the per-frame and the template's outer <|vision_start|>/<|vision_end|> included),
    token types, grids and pixels equal transformers' Qwen3VLProcessor, and the header-only count is exact."""
    processor = processors[family]
    encoder = ConversationEncoder(processor, QWEN3_SETTINGS, video_layout="timestamped_frames")
    stamps = set()
    for sample in real_media_samples:
        ours, ref = encoder.encode(sample), _processor_reference(encoder, sample)
        assert ours.input_ids == ref["input_ids"][0].tolist(), sample.id
        assert ours.mm_token_type_ids == ref["mm_token_type_ids"][0].tolist(), sample.id
        for key in ("image_grid_thw", "video_grid_thw", "pixel_values", "pixel_values_videos"):
            assert (getattr(ours, key) is None) == (key not in ref), (sample.id, key)
            assert key not in ref or torch.equal(getattr(ours, key), ref[key]), (sample.id, key)
        assert encoder.count_tokens(sample).total == len(ours.input_ids), sample.id
        stamps.update(t for t in processor.tokenizer.decode(ours.input_ids).split("<") if t.endswith(" seconds>"))
    assert len(real_media_samples) >= 50 and len(stamps) > 50, (len(real_media_samples), len(stamps))


@pytest.mark.parametrize("family", TIMESTAMPED)
def test_qwen3_golden_rendering_of_a_four_frame_video(processors, tmp_path, family):
    """A 4-frame clip at 2 fps, 64 x 64 px: frames 0+1 at (0 + 0.5) / 2 = 0.25 s and 2+3 at 1.25 s, written as
    Python's `f"{s:.1f}"` writes them (0.2, 1.2); 4 tokens per frame pair; the template's pair around it all."""
    from tests.helpers.media_factory import write_video

    clip = write_video(tmp_path / "four.mp4", frames=4, fps=2, width=64, height=64)
    sample = Sample("g", _user({"type": "video", "video": str(clip), "nframes": 4}, question="Then?"), "golden")
    encoder = ConversationEncoder(processors[family], QWEN3_SETTINGS)  # the layout from the processor's class
    encoded = encoder.encode(sample)
    pads = "<|video_pad|>" * 4
    expected = (
        f"<|im_start|>user\n<|vision_start|><0.2 seconds><|vision_start|>{pads}<|vision_end|>"
        f"<1.2 seconds><|vision_start|>{pads}<|vision_end|><|vision_end|>Then?<|im_end|>\n"
    )
    assert expected in processors[family].tokenizer.decode(encoded.input_ids)
    assert encoded.video_grid_thw.tolist() == [[2, 4, 4]]  # one row per video
    count = encoder.count_tokens(sample)  # timestamps and markers count as text
    assert (count.video, count.text + count.video) == (8, len(encoded.input_ids))
    untrained = [t for t, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX]
    assert processors[family].tokenizer.decode(untrained).count("seconds>") == 2


def test_a_per_item_pixel_range_that_is_empty_names_both_values_and_the_key(processors, media_pool):
    """A per-item min_pixels above the max_pixels in force is the item's options' fault, not the file's: the error
    names both values, where each comes from and what to change (it used to read "the file is truncated")."""
    root, images, videos = media_pool
    encoder = ConversationEncoder(processors["qwen2_5_vl"], SETTINGS)
    cases = [
        ({"type": "image", "image": str(root / images[0]), "min_pixels": 50000, "max_pixels": 40000}, "this item's"),
        ({"type": "image", "image": str(root / images[0]), "min_pixels": 300 * 784}, "model.max_pixels"),
        ({"type": "video", "video": str(root / videos[0]), "max_pixels": 1000}, "model.video_min_pixels"),
    ]
    for block, source in cases:
        sample = Sample("b", _user(block), "x.json[3]")
        low = block.get("min_pixels", SETTINGS.min_pixels if block["type"] == "image" else SETTINGS.video_min_pixels)
        high = block.get("max_pixels", SETTINGS.max_pixels)
        for run in (encoder.count_tokens, encoder.encode):
            with pytest.raises(DataError) as info:
                run(sample)
            message = str(info.value)
            assert message.startswith(f"x.json[3]: {block['type']} ") and info.value.kind == "format", message
            assert f"min_pixels={low} " in message and f"max_pixels={high} " in message, message
            assert source in message and "truncated" not in message, message


# ---------------------------------------------------------------- reply tokens under a whitespace-merging tokenizer
WHITESPACE_REPLIES = ["\nSeen.", "Seen.\n", "\n\nSeen.  ", " \nSeen. \n\n", "  Seen.", "Seen.\t", "\n  - a\n  - b\n"]


def _text_conversation(replies, system=True):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] if system else []
    for k, reply in enumerate(replies):
        messages += [
            {"role": "user", "content": [{"type": "text", "text": f"Look {k}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": reply}]},
        ]
    return messages


def test_replies_with_leading_and_trailing_whitespace_tokenize_as_the_processor(processors):
    """With Qwen's whitespace merges (the tiny Qwen3-VL tokenizer has them: "\\n\\n" is one token), the ids are the
    processor's whole-string ones for replies that begin or end with spaces and newlines, alone and in multi-turn
    conversations, with and without a generation prompt (what vLLM renders and tokenizes for a request). Labels: the
    reply's tokens and <|im_end|>; a token joining the header's newline to the reply's leading whitespace is the
    header's, never trained."""
    from finetune.model.tiny import WHITESPACE_MERGING_FAMILIES

    family = sorted(WHITESPACE_MERGING_FAMILIES)[0]
    processor, tokenizer = processors[family], processors[family].tokenizer
    assert len(tokenizer("\n\n", add_special_tokens=False)["input_ids"]) == 1  # the merge this test is about
    merged = 0
    for mode in ("assistant", "last_assistant"):
        encoder = ConversationEncoder(processor, SETTINGS, label_mode=mode)
        for n in (1, 2, 3):
            for start in range(len(WHITESPACE_REPLIES)):
                replies = [WHITESPACE_REPLIES[(start + k) % len(WHITESPACE_REPLIES)] for k in range(n)]
                messages = _text_conversation(replies, system=start % 2 == 0)
                sample = Sample("w", messages, "w.json[0]")
                ours = encoder.encode(sample)
                text = processor.apply_chat_template(messages, tokenize=False)
                assert ours.input_ids == processor(text=[text])["input_ids"][0], (mode, replies)
                assert encoder.count_tokens(sample).total == len(ours.input_ids)
                pieces = sum(
                    tokenizer([t for t, _ in encoder.segments(sample)], add_special_tokens=False)["input_ids"], []
                )
                merged += pieces != ours.input_ids
                # Labels: per trained turn, the reply without the leading whitespace the header's token took.
                trained = replies if mode == "assistant" else replies[-1:]
                got = [tokenizer.decode(s) for s in trained_spans(ours.input_ids, ours.labels)]
                for reply, span in zip(trained, got, strict=True):
                    assert span.endswith("<|im_end|>") and reply.endswith(span[: -len("<|im_end|>")]), (reply, span)
                    assert reply[: len(reply) - len(span) + len("<|im_end|>")].isspace() or span == reply + "<|im_end|>"
                # The prompt of the last turn: what a server renders (generation prompt) and tokenizes at once.
                prompt = Sample("p", messages[:-1], "w.json[0]")
                text = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
                prompt_ids = encoder.encode(prompt, generation_prompt=True).input_ids
                assert prompt_ids == processor(text=[text])["input_ids"][0], (mode, replies)
    assert merged > 10  # tokenizing in pieces would have given other ids for these
