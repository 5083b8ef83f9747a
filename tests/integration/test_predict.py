"""`python -m finetune.predict`: the same answers from the run directory (base + adapter) and from the merged
export, on an image and on a video, equal to `finetune.evaluate`'s predictions for the same samples; a file
of questions; per-item budgets; clear refusals."""

import json

import pytest

from finetune.base.errors import ConfigError
from finetune.evaluation.predict import find_model, question_sample
from tests.helpers import DEMO
from tests.helpers.family_paths import FAMILY_PER_PATH
from tests.helpers.recipe_runs import mini_dataset, run_module, tiny_run_overrides


def train_evaluate_export(root, family):
    """A family's demo recipe briefly trained on images and videos, evaluated and exported."""
    from finetune.cli.main import run_command

    train_file = mini_dataset(root / "train.json")
    run_dir = root / "run"
    overrides = tiny_run_overrides(family, run_dir, train_file, steps=8)
    for command in ("train", "evaluate", "export"):  # in this process: the command lines are tested elsewhere
        assert run_command(command, overrides) == 0
    predictions = [json.loads(line) for line in open(run_dir / "eval" / "predictions.jsonl")]
    return run_dir, train_file, predictions


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo recipe (Qwen2.5-VL) briefly trained on images and videos, evaluated and exported."""
    return train_evaluate_export(tmp_path_factory.mktemp("predict"), "qwen2_5_vl")


def _ask(model, record, capsys):
    """The CLI in this process (the streamed answer is what it prints on stdout)."""
    from finetune.cli.main import run_command

    def main(args):
        return run_command("predict", args)

    kind = "image" if record.get("images") else "video"
    question = record["messages"][0]["content"].replace(f"<{kind}>", "")
    media = DEMO / record[kind + "s"][0]
    capsys.readouterr()
    assert main(["--model", str(model), f"--{kind}", str(media), "--question", question, "--max-new-tokens", "4"]) == 0
    return capsys.readouterr().out.strip()


def _assert_same_answers_as_evaluation(trained, capsys):
    """An image and a video question asked of the run, its adapter and its export: evaluation's answers."""
    run_dir, train_file, predictions = trained
    records = {r["id"]: r for r in json.loads(train_file.read_text())}
    image = next(p for p in predictions if p["task"] == "colour")
    video = next(p for p in predictions if p["task"] == "direction")
    for expected in (image, video):
        record = records[expected["id"]]
        answers = {m.name: _ask(m, record, capsys) for m in (run_dir, run_dir / "adapter", run_dir / "merged")}
        assert set(answers.values()) == {expected["prediction"]}, (expected, answers)
    return run_dir, records, image


# One family per distinct path (tests/helpers/family_paths.py; Qwen2.5-VL: the test below). Every family's export
# answers as its adapter does (tests/integration/test_export.py) and its evaluation sees training's positions
# (tests/unit/model/test_positions_paths.py).
@pytest.mark.parametrize("family", [f for f in FAMILY_PER_PATH if f != "qwen2_5_vl"])
def test_each_path_answers_from_run_adapter_and_export_as_evaluation(tmp_path, family, capsys):
    _assert_same_answers_as_evaluation(train_evaluate_export(tmp_path, family), capsys)


def test_same_answers_from_run_adapter_and_export_as_evaluation(trained, capsys):
    run_dir, records, image = _assert_same_answers_as_evaluation(trained, capsys)
    # Once through a fresh interpreter, as a user runs it.
    result = run_module(
        "finetune.predict",
        [
            "--model",
            str(run_dir / "merged"),
            "--image",
            str(DEMO / records[image["id"]]["images"][0]),
            "--question",
            records[image["id"]]["messages"][0]["content"].replace("<image>", ""),
            "--max-new-tokens",
            "4",
        ],
    )
    assert result.stdout.strip() == image["prediction"]


def test_a_file_of_questions_gives_evaluations_answers(trained, tmp_path):
    run_dir, train_file, predictions = trained
    out = tmp_path / "preds.jsonl"
    run_module(
        "finetune.predict",
        [
            "--model",
            str(run_dir / "merged"),
            "--input",
            str(train_file),
            "--output",
            str(out),
            "--media-root",
            str(DEMO),
            "--max-new-tokens",
            "4",
            "--batch-size",
            "3",
        ],
    )
    got = [json.loads(line) for line in open(out)]
    assert [(g["id"], g["question"], g["reference"], g["prediction"]) for g in got] == [
        (p["id"], p["question"], p["reference"], p["prediction"]) for p in predictions
    ]
    # Questions without an answer are fine too (no reference then).
    unanswered = tmp_path / "questions.jsonl"
    unanswered.write_text(
        json.dumps(
            {
                "id": "q",
                "messages": [{"role": "user", "content": "<image>What colour?"}],
                "images": [json.loads(train_file.read_text())[0]["images"][0]],
            }
        )
        + "\n"
    )
    run_module(
        "finetune.predict",
        [
            "--model",
            str(run_dir),
            "--input",
            str(unanswered),
            "--output",
            str(out),
            "--media-root",
            str(DEMO),
            "--max-new-tokens",
            "2",
        ],
    )
    (only,) = [json.loads(line) for line in open(out)]
    assert only["id"] == "q" and "reference" not in only and only["question"] == "What colour?"


def test_per_item_budgets_go_on_the_media(tmp_path):
    video, image = tmp_path / "v.mp4", tmp_path / "i.png"
    video.write_bytes(b""), image.write_bytes(b"")
    sample = question_sample("Why?", [str(image)], [str(video)], {"fps": 1.0, "max_pixels": 50176, "nframes": 8})
    blocks = sample.messages[0]["content"]
    assert blocks[0] == {"type": "image", "image": str(image.resolve()), "max_pixels": 50176}  # video keys left out
    assert blocks[1] == {"type": "video", "video": str(video.resolve()), "fps": 1.0, "max_pixels": 50176, "nframes": 8}
    assert blocks[2] == {"type": "text", "text": "Why?"}


def test_model_folders_are_recognised_and_others_refused(trained, tmp_path, tiny_paths):
    run_dir, _, _ = trained
    assert find_model(str(run_dir))[1] is None and find_model(str(run_dir / "adapter"))[1] is None
    config, merged = find_model(str(run_dir / "merged"))
    assert merged == str(run_dir / "merged") and config.model.rope_rule == "qwen" and config.model.max_pixels == 3136
    config, plain = find_model(str(tiny_paths["qwen2_vl"]))  # a checkpoint without a saved recipe: Qwen's defaults
    assert (
        plain == str(tiny_paths["qwen2_vl"])
        and config.model.family == "qwen2_vl"
        and config.model.max_pixels == 1003520
    )
    with pytest.raises(ConfigError, match="no such directory"):
        find_model(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a run directory"):
        find_model(str(tmp_path))
    result = run_module("finetune.predict", ["--model", str(run_dir), "--input", "x.jsonl"], expect_failure=True)
    assert result.returncode == 2 and "--input needs --output" in result.stderr


def test_an_empty_answer_is_shown_as_such(tiny_paths, tmp_path, monkeypatch, capsys):
    """A model that ends its reply at once: stdout stays the (empty) answer, and the console says it is empty, for one
    question and for a file of them."""
    import finetune.model.load as modeling
    from finetune.cli.main import run_command

    def main(args):
        return run_command("predict", args)

    load = modeling.load_trained_model

    def ends_at_once(*args, **kwargs):  # the real model, made to generate only its end-of-text token
        model, processor = load(*args, **kwargs)
        generate, eos = model.generate, processor.tokenizer.eos_token_id
        model.generate = lambda **kw: generate(**{**kw, "max_new_tokens": 1, "forced_eos_token_id": eos})
        return model, processor

    monkeypatch.setattr(modeling, "load_trained_model", ends_at_once)
    image = next(r for r in json.loads((DEMO / "test.json").read_text()) if r.get("images"))["images"][0]
    model = str(tiny_paths["qwen2_5_vl"])
    capsys.readouterr()
    assert main(["--model", model, "--image", str(DEMO / image), "--question", "What colour?"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "" and "(empty answer: the model generated no text)" in out.err

    questions = tmp_path / "q.jsonl"
    record = {"messages": [{"role": "user", "content": "<image>What colour?"}], "images": [image]}
    questions.write_text("".join(json.dumps({**record, "id": f"q{i}"}) + "\n" for i in range(2)))
    argv = [
        "--model",
        model,
        "--input",
        str(questions),
        "--output",
        str(tmp_path / "p.jsonl"),
        "--media-root",
        str(DEMO),
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "wrote 2 predictions" in err and "2 empty answers" in err, err
    assert [json.loads(line)["prediction"] for line in open(tmp_path / "p.jsonl")] == ["", ""]
