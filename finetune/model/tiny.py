"""Deterministic tiny Qwen-VL checkpoints (one per family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5,
Qwen3.5-MoE) for tests and the demo.

No model hub is reachable on CI machines, so we build real checkpoints locally: the real model classes with
tiny dimensions, a byte-level BPE tokenizer trained offline with Qwen's special tokens and a Qwen-VL chat
template, and the real image/video processors configured as the family's published checkpoints are (patch size,
merge size, mean/std, budgets: the entry's `processor_settings`). The result is a standard Hugging Face directory that
`AutoProcessor` and `AutoModelForImageTextToText` load, so every code path is the one a real model takes.

Recipes name them `tiny://<family>` (`tiny://qwen2_5_vl`, one per entry of finetune/base/families.py, which holds
each family's part of the build); `resolve_model_path` builds them on first use into a cache directory shared by
the tests and the demo.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from finetune.base.families import FAMILIES

TINY_SCHEME = "tiny://"
# Bump when anything below changes what gets built: the cache key includes it (and the family's entry).
BUILD_VERSION = 6  # 4: fused MoE experts written in the published layout; 5: or split per expert; 6: whitespace merges
# Families whose tiny tokenizer also learns Qwen's merged whitespace tokens ("\n\n", "  ", ...): its pre-tokenizer
# already groups whitespace runs as Qwen2's does, but the plain corpus has no runs, so the plain vocabulary has no
# such token and tokenizing in pieces or whole gives the same ids. One family shows the difference (finetune/data/
# encode.py tokenizes the whole rendered conversation, as serving does); the others keep their pinned losses.
WHITESPACE_MERGING_FAMILIES = frozenset({"qwen3_vl"})

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Our own rendering of the Qwen-VL ChatML template: a default system prompt, `<|im_start|>role\n...<|im_end|>\n`
# per message, and `<|vision_start|><|image_pad|><|vision_end|>` (or `<|video_pad|>`) per media block.
# One line without whitespace control: the literal newlines are part of ChatML and must survive.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    # head_dim 16 -> 8 rotary frequencies split over (t, h, w), as [16, 24, 24] splits 64 in the 7B models.
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    # A wider init than the 0.02 default: measured to learn the demo tasks faster with a random frozen tower.
    initializer_range=0.1,
)


def _tokenizer_corpus() -> list[str]:
    """Deterministic training text: chat scaffolding, the demo vocabulary and plain English."""
    words = (
        "what which color colour shape is the a an of in on to and or it this that does do how many times "
        "dot move moves moving left right up down red green blue yellow black white circle square triangle "
        "cross video image picture photo frame frames second seconds describe answer question yes no one two "
        "three four five six seven eight nine ten flash flashes object scene person people child book ball "
        "you are a helpful assistant system user assistant summarise summarize compare camera still sport"
    ).split()
    lines = [" ".join(words[i : i + 9]) for i in range(0, len(words), 3)]
    lines += [w.capitalize() + "?" for w in words] + [w + "." for w in words]
    lines += ["What color is the shape?", "Which direction does the dot move?", "0123456789 ,.;:!?'\"()[]{}-+*/=%"]
    return lines * 4


# Text with the whitespace runs Qwen's published vocabularies hold as single tokens: blank lines, indents, spaces before
# a line break, runs of spaces between words (Qwen2's pre-tokenizer splits them off as `\s*[\r\n]+` and `\s+(?!\S)`).
WHITESPACE_CORPUS = [
    "one\n\ntwo",
    "one\n\n\nthree",
    "a  b",
    "a   b",
    "    indented",
    "end \nnext",
    "end  \n\nnext",
    "list:\n  item\n    sub",
    "\n\n",
    "\t\tdeep",
]


def build_tokenizer(whitespace_merges: bool = False):
    """Train a small byte-level BPE with Qwen2's pre-tokenizer and wrap it in the real Qwen2 tokenizer class; with
    `whitespace_merges`, on a corpus with whitespace runs too, so that (as in Qwen's vocabularies) "\n\n", "  " and
    the like are single tokens."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=640, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = _tokenizer_corpus() + (WHITESPACE_CORPUS * 40 if whitespace_merges else [])
    bpe.train_from_iterator(corpus, trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.model_max_length = 32768
    return tokenizer


def _model_config(family: str, tokenizer):
    """The family's config (AutoConfig by model_type) with the tiny dimensions: TEXT_DIMS (with the entry's
    `tiny_text` on top) and its `tiny_vision`, the merger projecting into the LLM's width."""
    from transformers import AutoConfig

    entry = FAMILIES[family]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        TEXT_DIMS,
        **(entry.tiny_text or {}),
        vocab_size=len(tokenizer),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(entry.tiny_vision, **{entry.merger_width: TEXT_DIMS["hidden_size"]})
    # Qwen3-VL's configs hold `tie_word_embeddings` at the top level too (the one the model ties by).
    tied = {"tie_word_embeddings": text["tie_word_embeddings"]} if "tie_word_embeddings" in text else {}
    return AutoConfig.for_model(
        entry.model_type,
        vision_config=vision,
        text_config=text,
        **tied,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_checkpoint(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a complete tiny checkpoint (weights, tokenizer, processors, chat template) to `out_dir`."""
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"Unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}.")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(whitespace_merges=family in WHITESPACE_MERGING_FAMILIES)
    config = _model_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    entry = FAMILIES[family]  # the processor classes by name: transformers is imported here only
    if entry.transposed_in_checkpoint or entry.per_expert_in_checkpoint:  # experts as the published checkpoints store
        from finetune.model.checkpoint_layout import published_layout  # them (transformers' own save may not)

        state_dict = published_layout(model.state_dict(), entry)
        model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict, save_original_format=False)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    settings = entry.processor_settings or {}
    processor = getattr(transformers, entry.processor)(
        image_processor=getattr(transformers, entry.image_processor)(**settings.get("image_processor", {})),
        tokenizer=tokenizer,
        video_processor=getattr(transformers, entry.video_processor)(**settings.get("video_processor", {})),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def _spec_hash(family: str, seed: int) -> str:
    import transformers

    entry = FAMILIES[family]
    # The family's part of the build lives in its registry entry, so an edit there rebuilds too.
    built_from = [
        entry.merger_width,
        entry.tiny_vision,
        entry.tiny_text,
        entry.processor,
        entry.image_processor,
        entry.video_processor,
        entry.processor_settings,
        entry.transposed_in_checkpoint,
        entry.per_expert_in_checkpoint,
    ]
    spec = dict(
        family=family, seed=seed, build=BUILD_VERSION, dims=TEXT_DIMS, entry=built_from, tf=transformers.__version__
    )
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def tiny_checkpoint(family: str, seed: int = 0) -> Path:
    """Path of the cached tiny checkpoint, building it first if needed (safe under concurrent builders)."""
    from finetune.base.paths import cache_root

    target = cache_root() / "tiny" / f"{family}-{_spec_hash(family, seed)}"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    try:
        build_tiny_checkpoint(family, staging, seed=seed)
        try:
            staging.rename(target)  # atomic: another process may have won the race, which is fine
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """`tiny://<family>` -> a local tiny checkpoint; anything else (hub id or local path) is returned unchanged."""
    if not name_or_path.startswith(TINY_SCHEME):
        return name_or_path
    family = name_or_path[len(TINY_SCHEME) :]
    if family not in FAMILIES:
        raise ValueError(
            f"Unknown tiny model {name_or_path!r}; use one of {', '.join(TINY_SCHEME + f for f in FAMILIES)}."
        )
    return str(tiny_checkpoint(family))


def main(argv: list[str]) -> None:
    """`finetune tiny`: build (or find) every tiny checkpoint and print where it is."""
    for fam in FAMILIES:
        print(fam, tiny_checkpoint(fam))
