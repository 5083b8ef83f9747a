"""`validate` finds every problem class, and training refuses the same samples at start-up (the commands run in this
process: their command lines are tested in tests/unit/cli/test_commands.py)."""

from fractions import Fraction
from types import SimpleNamespace

import av
import pytest

from finetune.recipe.data_settings import conversation_encoder, split_settings
from tests.helpers import DEMO
from tests.helpers.media_factory import write_dataset, write_image, write_video

GOOD = {
    "messages": [
        {"role": "user", "content": "<image>What color is the shape?"},
        {"role": "assistant", "content": "red"},
    ]
}


def _zero_frame_video(path):
    """A valid container header with a video stream and no frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(4))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    return path


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_image(root / "ok.png", 56, 56)
    (root / "junk.png").write_bytes(b"\x89PNG not really")
    (root / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    _zero_frame_video(root / "empty.mkv")
    write_video(root / "one_frame.mp4", frames=1, fps=4, width=32, height=32)
    q = lambda kind: [{"role": "user", "content": f"<{kind}>Q"}, {"role": "assistant", "content": "A"}]  # noqa: E731
    records = [
        {**GOOD, "id": "good-1", "images": ["ok.png"]},
        {"id": "missing", "messages": q("image"), "images": ["nowhere.png"]},
        {"id": "unreadable", "messages": q("image"), "images": ["junk.png"]},
        {"id": "corrupt-video", "messages": q("video"), "videos": ["junk.mp4"]},
        {"id": "zero-frames", "messages": q("video"), "videos": ["empty.mkv"]},
        {"id": "zero-duration", "messages": q("video"), "videos": ["one_frame.mp4"]},
        {"id": "mismatch", "messages": q("image"), "images": ["ok.png", "ok.png"]},
        {"id": "role", "messages": [{"role": "narrator", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"id": "empty", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]},
        {"id": "long", "messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "A"}]},
        {"id": "escape", "messages": q("image"), "images": ["../../etc/hostname"]},
        {**GOOD, "id": "good-2", "images": ["ok.png"]},
    ]
    return write_dataset(root / "bad.jsonl", records)


def _run(command, overrides, capsys):
    """A command in this process (the module forms' command lines: tests/unit/cli/test_commands.py): its exit status
    and what it printed."""
    from finetune.cli.main import run_command

    capsys.readouterr()
    code = run_command(command, overrides)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def _validate(overrides, capsys):
    return _run("validate", overrides, capsys)


def test_validate_reports_every_problem_class(bad_dataset, capsys):
    result = _validate(
        [
            f"data.train={bad_dataset}",
            "data.eval=null",
            "evaluation.after_training=false",
            "data.max_length=128",
            "--split",
            "train",
        ],
        capsys,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "12 records, 2 usable samples, 10 with problems" in out
    expected = {
        "missing media file: 1": "missing",
        "corrupt or truncated image: 1": "unreadable",
        "corrupt, zero-frame or zero-duration video: 2": "zero-frames",
        "video with fewer than 2 frames: 1": "zero-duration",
        "placeholder / media count mismatch: 1": "mismatch",
        "unknown role: 1": "role",
        "empty or missing assistant turn: 1": "empty",
        "longer than data.max_length: 1": "long",
        "media path outside the media root: 1": "escape",
    }
    for line, sample_id in expected.items():
        assert line in out, line
        assert f"(id {sample_id})" in out, sample_id
    assert "over data.max_length=128" in out and "FAILED: 10 problems" in out


def test_validate_passes_the_demo(capsys):
    result = _validate([], capsys)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train: 1200 records, 1200 usable samples, 0 with problems" in result.stdout
    assert "OK: every sample can be trained on." in result.stdout
    # The estimate is the trainer's own packing of the same counts: the row count training logs.
    from finetune.base.paths import resolve_data_file
    from finetune.data.packing import pack_rows
    from finetune.data.prepare import prepare_split
    from finetune.model.load import load_processor
    from finetune.recipe.load import load_config

    config = load_config([])
    encoder = conversation_encoder(load_processor(config.model), config)
    split = prepare_split(config.data.train, split_settings(config), encoder, resolve_data_file)
    rows = len(pack_rows(split.totals.tolist(), config.data.max_length, config.trainer.seed))
    assert f"packed into rows of {config.data.max_length} tokens as training packs them: {rows} rows" in result.stdout


def test_training_refuses_bad_samples_at_start_up_or_skips_them_with_a_count(tmp_path, bad_dataset, capsys, caplog):
    base = [
        "logger=none",
        f"data.train={bad_dataset}",
        "data.eval=null",
        "evaluation.after_training=false",
        "data.max_length=128",
        f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.max_steps=1",
        "trainer.per_device_train_batch_size=2",
    ]
    refused = _run("train", base, capsys)
    assert refused.returncode == 2
    assert "10 of 12 training samples cannot be trained on" in refused.stderr and "finetune.validate" in refused.stderr
    assert not (tmp_path / "run" / "adapter").exists()
    with caplog.at_level("INFO", logger="finetune.train"):
        assert _run("train", base + ["data.skip_invalid=true"], capsys).returncode == 0
    assert "skipping 10 of 12 training samples" in caplog.text
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_demo_validates_with_full_decoding(capsys):
    result = _validate(["--decode", "--split", "eval"], capsys)
    assert result.returncode == 0 and "eval: 200 records, 200 usable samples" in result.stdout, (
        result.stdout + result.stderr
    )
    assert DEMO.exists()


def test_an_empty_dataset_is_one_named_problem_everywhere(tmp_path, capsys):
    """validate with and without --decode, and training with and without data.skip_invalid, each on a store already
    written for the empty file (the second read of an empty dataset once ended in pyarrow's `memory_map` traceback)."""
    from finetune.cli.main import run_command

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = [f"data.train={empty}", "data.eval=null", "evaluation.after_training=false"]
    for decode in ([], ["--decode"], ["--decode"]):  # in this process: main() returns the command's exit status
        capsys.readouterr()
        rc = run_command("validate", base + ["--split", "train", *decode])
        out = capsys.readouterr().out
        assert rc == 1 and f"{empty}: no records at all" in out and "FAILED: 1 problems" in out, out

    overrides = base + ["logger=none", f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=1"]
    for skip in ("false", "true"):
        capsys.readouterr()
        assert run_command("train", overrides + [f"data.skip_invalid={skip}"]) == 2
        err = capsys.readouterr().err
        assert "error: the training data holds no records at all:" in err, err
        assert f"{empty}: no records at all" in err and "1 of 0" not in err
        assert not (tmp_path / "run" / "adapter").exists()
