"""The summary `./launch.sh` prints at the end of a run names the samples the run could not use: training samples
skipped because their media failed to decode (count, file, first ids and reasons) and evaluation questions that
could not be asked; only this launch's skips, not an earlier run's in the same directory."""

import json

from finetune.recipe.load import load_config
from finetune.records.rundir import RunDir
from finetune.runs.run_summary import file_size, summary


def _bad(sample_id, step, rank=0):
    message = f"/data/train.jsonl:{step} (id {sample_id}): corrupt or truncated video clip{sample_id}.mp4. Re-encode it"
    return {
        "id": sample_id,
        "source": "/data/train.jsonl",
        "kind": "bad_video",
        "error": message,
        "step": step,
        "rank": rank,
    }


def test_the_summary_lists_skipped_training_samples_and_unanswered_questions(tmp_path):
    config = load_config([f"trainer.output_dir={tmp_path}", "logger=none"])
    run = RunDir(tmp_path)
    run.adapter.mkdir()
    assert "skipped:" not in summary(config) and "unanswered:" not in summary(config)  # a clean run says nothing

    run.bad_samples_file.write_text(json.dumps(_bad("old", 1)) + "\n")  # an earlier run in the same directory
    start = file_size(run.bad_samples_file)
    with open(run.bad_samples_file, "a") as f:
        for entry in (_bad("a", 2), _bad("b", 3, rank=1), _bad("a", 9, rank=1), *(_bad(f"c{i}", 4) for i in range(4))):
            f.write(json.dumps(entry) + "\n")
    run.eval_dir.mkdir()
    answered = {"id": "e1", "task": "t", "question": "Q", "reference": "A", "prediction": "A"}
    failed = dict(answered, id="e2", prediction=None, error="(id e2) corrupt or truncated video. Re-encode it")
    (run.eval_dir / "predictions.jsonl").write_text(json.dumps(answered) + "\n" + json.dumps(failed) + "\n")
    metrics = {"n": 1, "accuracy": 1.0, "exact_match": 1.0, "chance": 0.25, "tasks": {}, "unanswered": ["e2"]}
    run.metrics_file.write_text(json.dumps(metrics))

    text = summary(config, start)
    print(text)
    assert f"  skipped:     6 training samples failed to decode and were left out: {run.bad_samples_file}" in text
    assert "    a: /data/train.jsonl:2 (id a): corrupt or truncated video clipa.mp4. Re-encode it" in text
    assert "    b: " in text and "    c0: " in text and "and 3 more" in text and "old" not in text
    assert "Re-encode it" in text  # the reason, not only the id
    assert f"  unanswered:  1 evaluation sample could not be asked (its media failed to decode): {run.eval_dir}" in text
    assert "    e2: (id e2) corrupt or truncated video" in text
    assert "    old: " in summary(config)  # from the start of the file: a resumed run counts its earlier skips too


def _evaluates(overrides: list[str]) -> bool:
    """Whether the run's commands end with the standalone evaluation."""
    from finetune.runs.launch import commands

    config = load_config(["logger=none", *overrides])
    return any("finetune.evaluate" in command for command in commands(config, [], []))


def test_evaluation_after_training_auto_evaluates_whenever_an_eval_set_is_given():
    assert load_config([]).evaluation.after_training == "auto"  # the default
    assert _evaluates([])  # the demo gives data.eval
    assert not _evaluates(["data.eval=null"])  # auto without an eval set: nothing to evaluate, no error
    assert _evaluates(["evaluation.after_training=true"])
    assert not _evaluates(["evaluation.after_training=false"])
    # with evaluation.steps, training ends with an evaluation: no second one
    assert not _evaluates(["evaluation.steps=10"]) and load_config(["evaluation.steps=10"]).evaluates_after_training()
    assert not load_config(["data.eval=null"]).evaluates_after_training()


def test_a_given_eval_set_left_unevaluated_is_named_in_the_summary_with_the_key(tmp_path):
    base = [f"trainer.output_dir={tmp_path}", "logger=none"]
    config = load_config([*base, "evaluation.after_training=false"])
    line = (
        f"  evaluation:  not run: data.eval={config.data.eval} was given but evaluation.after_training=false; set "
        "evaluation.after_training=auto to evaluate it after training (or run `./launch.sh evaluate` with this run's "
        "overrides now)"
    )
    assert line in summary(config).splitlines()
    for evaluated in ([], ["evaluation.after_training=false", "data.eval=null"], ["evaluation.after_training=true"]):
        assert "not run" not in summary(load_config([*base, *evaluated])), evaluated
