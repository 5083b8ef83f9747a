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
