"""Turn a canonical conversation into model inputs, or count its tokens from media metadata alone.

Text is rendered with the processor's own chat template and tokenized whole, as serving tokenizes it, so the
trained tokens are known exactly: each assistant reply and its end-of-turn token; never the system or user turns, the
`<|im_start|>assistant\\n` header or a vision pad. Vision follows qwen-vl-utils: every image and video is
resized by us to its `smart_resize` target (so the processor's own resize is the identity), videos are
sampled with the container's fps, and the processor only normalises and patchifies; the sizing factor (patch x
merge) is the processor's, as the checkpoint configures it. Each `<|image_pad|>` expands to the plan's token count;
each `<|video_pad|>` as the family's `video_layout` says (finetune/base/families.py): to the plan's tokens, or
(Qwen3-VL) per frame pair to `<{s:.1f} seconds><|vision_start|>` + its tokens + `<|vision_end|>`, the ids
transformers' Qwen3VLProcessor writes; those timestamps and markers are text that is never trained.
`count_tokens` runs the same plan on headers only, which is why it equals `len(encode(...).input_ids)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from finetune.base.errors import DataError
from finetune.base.families import FAMILIES, VIDEO_LAYOUTS
from finetune.data.conversation import Sample
from finetune.data.media import decode_frames, load_image, probe_image, probe_video
from finetune.data.media_errors import media_error
from finetune.data.modes import LabelMode
from finetune.data.shapes import keeps_texts, render_by_shape
from finetune.data.vision import FRAME_FACTOR, MERGE, PATCH, VideoPlan, VisionSettings, tokens_for

IGNORE_INDEX = -100
_REPLY_MARK = "\x00reply {} here\x00"  # stands in for a reply to find where the template puts it


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: list[float] | None = None

    def vision(self) -> dict:
        """The pixel tensors, grids and seconds per grid of this encoding, as `ConversationEncoder.encode` takes them
        back (`vision=`) for another conversation over the same media."""
        keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass(frozen=True)
class TokenCount:
    text: int
    image: int
    video: int

    @property
    def total(self) -> int:
        return self.text + self.image + self.video


@dataclass(frozen=True)
class ImagePlan:
    path: str
    height: int  # resized
    width: int
    patch: int = PATCH
    merge: int = MERGE

    @property
    def grid(self) -> tuple[int, int, int]:
        return 1, self.height // self.patch, self.width // self.patch

    @property
    def tokens(self) -> int:
        return tokens_for(1, self.height, self.width, self.patch, self.merge)


def video_layout_of(processor) -> str:
    """The `video_layout` of the families whose processor class `processor` is (Qwen3VLProcessor: timestamped
    frames); a processor no family names keeps one block per video."""
    layouts = {f.video_layout for f in FAMILIES.values() if f.processor == type(processor).__name__}
    if len(layouts) > 1:
        raise ValueError(f"families with processor {type(processor).__name__} disagree on their video layout")
    return layouts.pop() if layouts else "one_block"


class ConversationEncoder:
    def __init__(
        self,
        processor,
        vision: VisionSettings,
        label_mode: LabelMode = LabelMode.ASSISTANT,
        max_length: int | None = None,
        video_layout: str | None = None,
    ):
        """`video_layout`: the family's (finetune/base/families.py); None: the one of the processor's class."""
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.vision = vision
        self.label_mode = LabelMode(label_mode)
        self.max_length = max_length
        self.image_pad_id = processor.image_token_id
        self.video_pad_id = processor.video_token_id
        # Qwen2.5-VL spaces video frames in absolute time; Qwen2-VL has no such input.
        self.uses_time = "second_per_grid_ts" in processor.model_input_names
        # The checkpoint's geometry, as its processors hold it: pixels per patch side, patches per LLM token side.
        image, video = processor.image_processor, processor.video_processor
        self.patch, self.merge = int(image.patch_size), int(image.merge_size)
        geometry = {
            "image": (self.patch, self.merge, int(getattr(image, "temporal_patch_size", FRAME_FACTOR))),
            "video": (int(video.patch_size), int(video.merge_size), int(video.temporal_patch_size)),
        }
        if len(set(geometry.values())) != 1 or geometry["video"][2] != FRAME_FACTOR:
            raise ValueError(
                f"the processor's (patch, merge, temporal patch) sizes {geometry} must agree, with temporal patch "
                f"{FRAME_FACTOR} (frames are sampled in pairs)"
            )
        self.video_layout = video_layout or video_layout_of(processor)
        if self.video_layout not in VIDEO_LAYOUTS:
            raise ValueError(f"video_layout {self.video_layout!r} is not one of {VIDEO_LAYOUTS}")
        self.vision_start_id = self.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id = self.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self._timestamp_ids: dict[str, list[int]] = {}
        self._shapes: dict = {}  # conversation shape -> its render cut at the texts (finetune/data/shapes.py)

    # ----- media plans (headers only) -----
    def image_plans(self, sample: Sample) -> list[ImagePlan]:
        plans = []
        for block in sample.media("image"):
            try:
                spec = self.vision.image_spec(block, self.patch, self.merge)
            except (TypeError, ValueError) as err:
                raise DataError(f"{sample.source}: image {block['image']}: {err}.", "format") from err
            try:
                width, height = probe_image(block["image"])
                plans.append(ImagePlan(block["image"], *spec.target(height, width), self.patch, self.merge))
            except Exception as err:  # Pillow raises its own types (e.g. DecompressionBombError)
                raise media_error(sample, "image", block["image"], block["image"], err) from err
        return plans

    def video_plans(self, sample: Sample) -> list[tuple[object, VideoPlan]]:
        plans = []
        for block in sample.media("video"):
            name = block["video"] if isinstance(block["video"], str) else f"{len(block['video'])} frame files"
            try:
                spec = self.vision.video_spec(block, self.patch, self.merge)
            except (TypeError, ValueError) as err:
                raise DataError(f"{sample.source}: video {name}: {err}.", "format") from err
            try:
                info = probe_video(block["video"], spec.frames_fps)
                plans.append((info, spec.plan(info.total_frames, info.fps, info.height, info.width)))
            except Exception as err:  # av raises its own error types for unreadable files
                raise media_error(sample, "video", name, block["video"], err) from err
        return plans

    # ----- text -----
    def _render(self, messages: list[dict], generation_prompt: bool, sample: Sample) -> str:
        if not messages:
            return ""
        try:
            return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja and template errors: a turn layout the template does not accept
            raise DataError(
                f"{sample.source}: the chat template cannot render this conversation ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Check the order of its turns.",
                "structure",
            ) from err

    def segments(self, sample: Sample, generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) pieces: each assistant reply with its end-of-turn token is
        trained (per label mode), everything else is not. Linear in the number of turns: the conversation is
        rendered once as it is and once with each reply replaced by a marker that locates it. Where a template
        does not allow that (it rewrites or trims replies), every turn is rendered as a continuation instead."""
        messages = sample.messages
        first = next((m["role"] for m in messages if m["role"] != "system"), None)
        if first is not None and first != "user":
            raise DataError(
                f"{sample.source}: the conversation starts with an {first} turn; after an optional system "
                "turn the first turn must be the user's. Add the user's question before it.",
                "structure",
            )
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained_turns = set(assistant_turns[-1:] if self.label_mode is LabelMode.LAST_ASSISTANT else assistant_turns)
        self._template_keeps_replies()  # probed once
        pieces = self._segments_by_markers(sample, assistant_turns, trained_turns, generation_prompt)
        if pieces is None:
            pieces = self._segments_turn_by_turn(sample, assistant_turns, trained_turns, generation_prompt)
        if self.label_mode is LabelMode.ALL:
            pieces = [(text, True) for text, _ in pieces]
        return [(text, trained) for text, trained in pieces if text]

    def _reply_piece(self, sample: Sample, turn: int, reply: str, trained: bool) -> list[tuple[str, bool]]:
        body = reply.rstrip()  # the newline after the end-of-turn token belongs to the next prompt
        if not body or body == self.tokenizer.eos_token:
            raise DataError(f"{sample.source}: assistant turn {turn} is empty.", "empty_turn")
        return [(body, trained), (reply[len(body) :], False)]

    def _end_of_turn(self) -> str | None:
        """What the template writes after an assistant reply (`<|im_end|>\\n` for Qwen), or None if it cannot tell."""
        if not hasattr(self, "_end_of_turn_text"):
            probe = [
                {"role": "user", "content": [{"type": "text", "text": "Q"}]},
                {"role": "assistant", "content": [{"type": "text", "text": _REPLY_MARK.format(0)}]},
            ]
            try:
                text = self.processor.apply_chat_template(probe, tokenize=False)
                self._end_of_turn_text = text.split(_REPLY_MARK.format(0), 1)[1]
            except Exception:  # a template that needs more than this probe: use the turn-by-turn route
                self._end_of_turn_text = None
        return self._end_of_turn_text

    def _template_keeps_replies(self) -> bool:
        """Whether the template writes every reply exactly as given, wherever it stands: then a conversation needs one
        render (with markers). Probed once on replies a template might rewrite: surrounding spaces and newlines,
        reasoning blocks in earlier turns, markup and template syntax, non-ASCII; otherwise every conversation's
        marker layout is checked against its plain render."""
        if not hasattr(self, "_keeps_replies"):
            replies = [
                "  spaced reply  ",
                "line one\nline two\n\n",
                "<think>\nreasoning\n</think>\n\nanswer",
                "quotes \" ' & < > {{ x }} {% if %}",
                "é 日本 🙂",
                "last",
            ]
            turns = [{"role": "system", "content": [{"type": "text", "text": "S"}]}]
            for k, reply in enumerate(replies):
                turns += [
                    {"role": "user", "content": [{"type": "text", "text": f"question {k}"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": reply}]},
                ]
            answers = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
            self._keeps_replies = False  # while probing, every layout is checked against the plain render
            try:
                checks = [
                    self._segments_by_markers(
                        Sample("probe", turns[:cut], "the chat template probe"),
                        [i for i in answers if i < cut],
                        set(),
                        generation_prompt,
                    )
                    is not None
                    for cut in (len(turns), len(turns) - 1)  # ending with a reply, and with a question
                    for generation_prompt in (False, True)
                ]
                self._keeps_replies = all(checks)
            except Exception:  # a template that cannot render the probe: check every conversation
                self._keeps_replies = False
        return self._keeps_replies

    def _segments_by_markers(self, sample, assistant_turns, trained_turns, generation_prompt):
        end = self._end_of_turn()
        messages = sample.messages
        if end is None or any(b["type"] != "text" for i in assistant_turns for b in messages[i]["content"]):
            return None
        marked = list(messages)
        for k, i in enumerate(assistant_turns):
            marked[i] = {"role": "assistant", "content": [{"type": "text", "text": _REPLY_MARK.format(k)}]}
        layout = self._layout(marked, generation_prompt, sample)
        pieces, pos = [], 0
        for k, i in enumerate(assistant_turns):
            mark = _REPLY_MARK.format(k)
            at = layout.find(mark, pos)
            if at < 0 or not layout.startswith(end, at + len(mark)):
                return None
            reply = "".join(b["text"] for b in messages[i]["content"]) + end
            pieces += [(layout[pos:at], False), *self._reply_piece(sample, i, reply, i in trained_turns)]
            pos = at + len(mark) + len(end)
        pieces.append((layout[pos:], False))
        if getattr(self, "_keeps_replies", False):
            return pieces
        if "".join(text for text, _ in pieces) != self._render(messages, generation_prompt, sample):
            return None  # the template changes replies (trims, escapes): render turn by turn
        return pieces

    def _layout(self, marked: list[dict], generation_prompt: bool, sample: Sample) -> str:
        """The render of a conversation whose replies are markers: from its shape's one render when the template
        writes replies and texts verbatim (both probed once), else rendered."""
        if getattr(self, "_keeps_replies", False) and self._template_keeps_texts():
            return render_by_shape(self._shapes, self._render, marked, generation_prompt, sample)
        return self._render(marked, generation_prompt, sample)

    def _template_keeps_texts(self) -> bool:
        if not hasattr(self, "_keeps_texts"):
            try:
                self._keeps_texts = keeps_texts(self._render, _REPLY_MARK)
            except Exception:  # a template that cannot render the probe: render every conversation
                self._keeps_texts = False
        return self._keeps_texts

    def _segments_turn_by_turn(self, sample, assistant_turns, trained_turns, generation_prompt):
        """Each assistant turn as the difference between renders with and without it (quadratic in turns)."""
        messages = sample.messages
        pieces, done = [], ""
        for i in assistant_turns:
            prefix, full = self._render(messages[:i], True, sample), self._render(messages[: i + 1], False, sample)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError(
                    f"{sample.source}: turn {i} cannot be rendered as a continuation of the turns before it "
                    "(a conversation must start with a system or user turn, and the chat template must not "
                    "rewrite earlier turns).",
                    "structure",
                )
            pieces += [
                (prefix[len(done) :], False),
                *self._reply_piece(sample, i, full[len(prefix) :], i in trained_turns),
            ]
            done = full
        tail = self._render(messages, generation_prompt, sample)
        pieces.append((tail[len(done) :], False))
        return pieces

    def _tokens(self, sample: Sample, generation_prompt: bool, labels: bool = True) -> tuple[list[int], list[int]]:
        """Token ids with ONE pad per image/video, and their labels (none when `labels` is false: the pre-pass counts
        ids only). The rendered conversation is tokenized whole, as the processor and vLLM tokenize a prompt (Qwen's
        tokenizers merge whitespace runs, so pieces tokenized apart can give other ids: `assistant\\n` + `\\nreply` is
        `\\n\\n` whole). A token is trained when its first character is in a trained piece: a token that joins the
        header's newline to a reply's leading whitespace belongs to the header and is not trained (docs/fidelity.md,
        "Reply tokens")."""
        pieces = self.segments(sample, generation_prompt)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer gives no offsets: each piece on its own
            ids, trained = [], []
            for (_, is_trained), piece in zip(pieces, self._tokenize([text for text, _ in pieces])):
                ids += piece
                trained += [is_trained] * len(piece)
        elif not labels:  # the same ids without the offsets (encode_batch_fast: no offsets computed)
            return self._tokenize(["".join(text for text, _ in pieces)])[0], []
        else:
            encoding = backend.encode("".join(text for text, _ in pieces), add_special_tokens=False)
            ids, trained, ends, k, end = encoding.ids, [], [], 0, 0
            for text, _ in pieces:
                end += len(text)
                ends.append(end)
            for start, _ in encoding.offsets:
                while start >= ends[k]:
                    k += 1
                trained.append(pieces[k][1])
        if not labels:
            return ids, []
        pads = (self.image_pad_id, self.video_pad_id)
        return ids, [t if keep and t not in pads else IGNORE_INDEX for t, keep in zip(ids, trained)]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens added (the fast tokenizer's backend, in one call)."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # encode_batch_fast (tokenizers >= 0.21): the same ids without the character offsets nothing here reads.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    def _check_pads(self, sample: Sample, ids: list[int], n_images: int, n_videos: int) -> None:
        found = (ids.count(self.image_pad_id), ids.count(self.video_pad_id))
        if found != (n_images, n_videos):
            raise DataError(
                f"{sample.source}: the chat template rendered {found[0]} image and {found[1]} video placeholders for "
                f"{n_images} image and {n_videos} video files.",
                "placeholders",
            )

    def _check_length(self, sample: Sample, length: int) -> None:
        if self.max_length is not None and length > self.max_length:
            raise DataError(
                f"{sample.source}: {length} tokens, {length - self.max_length} more than data.max_length="
                f"{self.max_length}. Nothing is truncated (cutting vision tokens breaks the model inputs): raise "
                "data.max_length, lower model.max_pixels / model.video_max_pixels / model.video_fps, or remove "
                "the sample.",
                "too_long",
            )

    # ----- how a video pad expands -----
    def _timestamps(self, plans: list[VideoPlan]) -> list[list[list[int]]]:
        """Per video, the token ids of each frame pair's `<{s:.1f} seconds>` (tokenized alone: in the rendered text
        special tokens stand on both sides of it), tokenized once per distinct text."""
        texts = [[f"<{seconds:.1f} seconds>" for seconds in plan.timestamps] for plan in plans]
        new = sorted({t for video in texts for t in video} - self._timestamp_ids.keys())
        self._timestamp_ids.update(zip(new, self._tokenize(new)))
        return [[self._timestamp_ids[t] for t in video] for video in texts]

    def _video_expansions(self, plans: list[VideoPlan]) -> list[list[int]]:
        """The token ids each video's `<|video_pad|>` becomes."""
        if self.video_layout == "one_block":
            return [[self.video_pad_id] * plan.tokens for plan in plans]
        expansions = []
        for plan, stamps in zip(plans, self._timestamps(plans)):
            frame = [self.vision_start_id] + [self.video_pad_id] * plan.frame_tokens + [self.vision_end_id]
            expansions.append([token for stamp in stamps for token in stamp + frame])
        return expansions

    def _video_text_tokens(self, plans: list[VideoPlan]) -> int:
        """Text tokens a video's expansion adds besides its vision tokens (timestamps and their markers)."""
        if self.video_layout == "one_block":
            return 0
        return sum(len(stamp) + 2 for stamps in self._timestamps(plans) for stamp in stamps)

    # ----- the pre-pass -----
    def count_tokens(self, sample: Sample) -> TokenCount:
        """Exact token count from media headers (no pixel is decoded); raises DataError like `encode`."""
        ids, _ = self._tokens(sample, generation_prompt=False, labels=False)
        images, videos = self.image_plans(sample), self.video_plans(sample)
        self._check_pads(sample, ids, len(images), len(videos))
        count = TokenCount(
            text=len(ids) - len(images) - len(videos) + self._video_text_tokens([plan for _, plan in videos]),
            image=sum(p.tokens for p in images),
            video=sum(plan.tokens for _, plan in videos),
        )
        return count

    # ----- encoding -----
    def _encode_images(self, sample: Sample, plans: list[ImagePlan]) -> dict:
        if not plans:
            return {}
        values, grids = [], []
        for plan in plans:
            try:
                image = load_image(plan.path, target=(plan.height, plan.width))
            except Exception as err:
                raise media_error(sample, "image", plan.path, plan.path, err) from err
            # qwen-vl-utils' fetch_image resize; the processor then takes the pixels as they are.
            image = image.resize((plan.width, plan.height), Image.Resampling.BICUBIC)
            out = self.processor.image_processor(images=[image], do_resize=False, return_tensors="pt")
            values.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        return {"pixel_values": torch.cat(values), "image_grid_thw": torch.cat(grids)}

    def _encode_videos(self, sample: Sample, plans: list[tuple[object, VideoPlan]]) -> dict:
        if not plans:
            return {}
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resize

        values, grids = [], []
        for info, plan in plans:
            try:
                frames = torch.from_numpy(decode_frames(info, plan.indices)).permute(0, 3, 1, 2)
            except Exception as err:
                raise media_error(sample, "video", info.source, info.source, err) from err
            # The same resize as qwen-vl-utils' fetch_video (bicubic, antialiased, on uint8 frames).
            frames = resize(frames, [plan.height, plan.width], interpolation=InterpolationMode.BICUBIC, antialias=True)
            out = self.processor.video_processor(
                videos=[frames],
                do_resize=False,  # already at the plan's size
                do_sample_frames=False,  # already sampled, with the real fps
                cap_pixels_per_frame=False,  # the per-frame cap is already in the plan
                return_tensors="pt",
            )
            values.append(out["pixel_values_videos"])
            grids.append(out["video_grid_thw"])
        result = {"pixel_values_videos": torch.cat(values), "video_grid_thw": torch.cat(grids)}
        if self.uses_time:
            result["second_per_grid_ts"] = [plan.second_per_grid for _, plan in plans]
        return result

    def encode(self, sample: Sample, generation_prompt: bool = False, vision: dict | None = None) -> EncodedSample:
        """Tokens, labels and vision tensors for one sample. With `generation_prompt`, the sample must end
        before the reply to generate (used by evaluation). `vision`: `EncodedSample.vision()` of another conversation
        over the same media (the other reply of a preference pair), used instead of decoding the media again; its
        grids are still checked against this sample's plan."""
        ids, labels = self._tokens(sample, generation_prompt)
        image_plans, video_plans = self.image_plans(sample), self.video_plans(sample)
        self._check_pads(sample, ids, len(image_plans), len(video_plans))
        expansions = {
            self.image_pad_id: iter([[self.image_pad_id] * p.tokens for p in image_plans]),
            self.video_pad_id: iter(self._video_expansions([plan for _, plan in video_plans])),
        }
        input_ids, full_labels = [], []
        for token, label in zip(ids, labels):
            if token in expansions:  # vision pads and what a video adds around them: never trained
                expanded = next(expansions[token])
                input_ids += expanded
                full_labels += [IGNORE_INDEX] * len(expanded)
            else:
                input_ids.append(token)
                full_labels.append(label)
        self._check_length(sample, len(input_ids))
        if vision is None:
            vision = {**self._encode_images(sample, image_plans), **self._encode_videos(sample, video_plans)}
        _check_grids(sample, vision, image_plans, video_plans)
        type_ids = [1 if t == self.image_pad_id else 2 if t == self.video_pad_id else 0 for t in input_ids]
        return EncodedSample(input_ids, full_labels, type_ids, **vision)


def _check_grids(sample: Sample, vision: dict, image_plans: list[ImagePlan], video_plans: list) -> None:
    """The processor's grids must be the ones our plan counted tokens for (an internal consistency check)."""
    planned = [p.grid for p in image_plans]
    got = [tuple(g) for g in vision.get("image_grid_thw", torch.empty(0, 3)).tolist()]
    planned_v = [plan.grid for _, plan in video_plans]
    got_v = [tuple(g) for g in vision.get("video_grid_thw", torch.empty(0, 3)).tolist()]
    if planned != got or planned_v != got_v:
        raise RuntimeError(f"{sample.source}: processor grids {got}/{got_v} differ from the plan {planned}/{planned_v}")
