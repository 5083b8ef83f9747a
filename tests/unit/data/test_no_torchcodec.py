"""Where torchcodec cannot load (no system FFmpeg, no root: the usual GPU cluster), the launcher names the video
decoder once, for every process it starts. The whole pipeline without torchcodec (train -> evaluate -> export ->
predict, with DataLoader workers) runs in tests/integration/test_demo_end_to_end.py: the Qwen2-VL demo runs that way."""

import sys

import pytest

import finetune.data.media as media
from finetune.base.errors import ConfigError
from finetune.runs.launch import video_decoder_env


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
