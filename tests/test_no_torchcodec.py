"""Where torchcodec cannot load (no system FFmpeg, no root: the usual GPU cluster), the whole pipeline still runs:
training, evaluation, export and predict decode videos with PyAV through our loader; the export's grid check gives
transformers (which decodes a video file only with torchcodec) the frames we decoded and says so in its report;
the launcher names the decoder once, for every process it starts."""

import json
import sys

import pytest

import finetune.data.media as media
from finetune.config import ConfigError
from finetune.launch import video_decoder_env
from tests.helpers import DEMO
from tests.helpers.no_torchcodec import REASON, hidden_torchcodec_env
from tests.helpers.recipe_runs import mini_dataset, run_module

PYAV_LINE = f"video decoder: PyAV, because torchcodec cannot load here (ImportError: {REASON})"


def test_the_launcher_decides_the_video_decoder_once_for_its_processes(monkeypatch):
    monkeypatch.setattr(media, "torchcodec_problem", lambda: "ImportError: no FFmpeg")
    line, env = video_decoder_env({"PATH": "/bin"})
    assert line.startswith("video decoder: PyAV, because torchcodec cannot load here (ImportError: no FFmpeg)")
    assert "apt-get install ffmpeg" in line and env == {"PATH": "/bin", "FINETUNE_VIDEO_BACKEND": "pyav"}
    assert (
        video_decoder_env({"FINETUNE_VIDEO_BACKEND": "pyav"})[0] == "video decoder: PyAV (FINETUNE_VIDEO_BACKEND=pyav)"
    )
    with pytest.raises(ConfigError, match="FINETUNE_VIDEO_BACKEND=torchcodec.*cannot load here.*Unset"):
        video_decoder_env({"FINETUNE_VIDEO_BACKEND": "torchcodec"})
    with pytest.raises(ConfigError, match="FINETUNE_VIDEO_BACKEND=decord: use one of torchcodec, pyav"):
        video_decoder_env({"FINETUNE_VIDEO_BACKEND": "decord"})

    monkeypatch.setattr(media, "torchcodec_problem", lambda: None)
    monkeypatch.setitem(sys.modules, "torchcodec", type("torchcodec", (), {"ffmpeg_major_version": 7}))
    line, env = video_decoder_env({})
    assert line == "video decoder: torchcodec (FFmpeg 7)" and env == {}  # the processes find it themselves


@pytest.mark.slow
def test_the_whole_pipeline_runs_where_torchcodec_cannot_load(tmp_path):
    """One short launch (train -> evaluate -> export) with DataLoader workers, then predict on a video, all in an
    environment whose `import torchcodec` fails."""
    hidden = hidden_torchcodec_env(tmp_path / "hide")
    hidden["FINETUNE_VIDEO_BACKEND"] = ""  # decided by the launcher, whatever the test runner's environment says
    data = mini_dataset(tmp_path / "train.json")
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=demo",
        "logger=none",
        f"trainer.output_dir={run_dir}",
        "trainer.max_steps=3",
        "trainer.per_device_train_batch_size=8",
        "trainer.dataloader_num_workers=2",  # the decoder is named once, not once per worker
        f"data.train={data}",
        f"data.eval={data}",
        f"data.media_root={DEMO}",
    ]
    launch = run_module("finetune.launch", overrides, timeout=600, env=hidden)
    output = launch.stdout + launch.stderr
    assert output.count("video decoder: ") == 1 and PYAV_LINE in launch.stdout, output[-3000:]
    assert "decoding videos with PyAV instead" not in output  # no process had to find out again
    assert "Traceback" not in output and "Run directory:" in launch.stdout and "  merged:" in launch.stdout

    report = json.loads((run_dir / "merged" / "export_report.json").read_text())
    assert report["passed"] and report["served_grids"]["mismatches"] == [] and report["batch"]["videos"] > 0
    assert report["served_grids"]["video_input"] == "frames" and "video grids checked on frames we decoded" in output
    how = report["served_grids"]["videos"]
    assert how.startswith(f"transformers cannot decode video files here (torchcodec: ImportError: {REASON})")
    assert how.endswith("decoded by finetune's loader (PyAV)")
    assert "decoded by finetune's loader (PyAV)" in (run_dir / "merged" / "README.md").read_text()

    predictions = {p["id"]: p for p in map(json.loads, open(run_dir / "eval" / "predictions.jsonl"))}
    video = next(r for r in json.loads(data.read_text()) if r.get("videos"))
    question = video["messages"][0]["content"].replace("<video>", "")
    ask = ["--video", str(DEMO / video["videos"][0]), "--question", question, "--max-new-tokens", "4"]
    answer = run_module("finetune.predict", ["--model", str(run_dir / "merged"), *ask], env=hidden)
    assert "Traceback" not in answer.stderr
    assert answer.stdout.strip() == predictions[video["id"]]["prediction"]
