"""Data at scale, measured side by side in one run on one generated LLaVA-style set.

    .venv/bin/python benchmarks/data_scale.py [--samples 100000] [--images 5000] [--videos 300] [--root DIR]
        [--compare REV] [--only 1,2]

`--compare REV` measures the commit REV too, in the same run on the same set: REV is checked out into a temporary
`git worktree` and this script measures it there (its code first on the path, its training process started there),
then both sets of figures are printed side by side, with whether the two commits' token counts are identical.
`--only` runs some of the numbered measurements below (default: all).

The set (generated once into --root, default $FINETUNE_CACHE_DIR/bench/data_scale-<samples>): JPEGs and MP4s,
LLaVA records (`image`/`video` + `conversations`), 40 % of them multi-turn (2-4 rounds), in one JSON file.
Reported (the tiny Qwen2.5-VL of the demo recipe, so the model costs little next to the data):
  1. cold start (no store) and warm start (store present) to the end of the first optimizer step: wall time of
     `python -m finetune.train ... trainer.max_steps=1`, and the peak RSS of that training process;
  2. token pre-pass samples/s on 1 and on N processes (the same records, counts compared);
  3. private memory a forked DataLoader worker gains by touching every sample: the store against a list of
     Python Sample objects (what the pre-store code held), relative to the store's size;
  4. store refresh after appending one sample (one record counted);
  5. pre-pass samples/s of 1/4/8/16-round conversations: our one-render route against rendering each turn
     (the quadratic route the pre-store code took);
  6. `validate`'s packing estimate (the trainer's own pack_rows) on the set's lengths.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
# The code measured: this checkout, or the tree `--tree` names (a `--compare` worktree), first on the path.
REPO = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve() if "--tree" in sys.argv else HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
# finetune from REPO now, before data_pipeline puts this checkout first on the path (a statement: isort keeps it here)
finetune = importlib.import_module("finetune")

from data_pipeline import write_video  # noqa: E402

assert Path(finetune.__file__).resolve().is_relative_to(REPO), f"finetune imported from {finetune.__file__}, not {REPO}"

WORDS = "what is shown in this picture the red dot moves left right up down and then stops twice quickly".split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def generate(root: Path, samples: int, images: int, videos: int) -> Path:
    data = root / "train.json"
    if data.exists():
        return data
    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(images):
        w = rng.randint(64, 640)
        h = int(w * rng.uniform(0.5, 1.5))
        array = np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(array).resize((w, h)).save(root / "images" / f"{i:05d}.jpg", quality=80)
    for i in range(videos):
        write_video(root / "videos" / f"{i:04d}.mp4", rng.randint(2, 20), rng.choice([10, 15, 25]), 96, 64, seed=i)
    records = []
    for i in range(samples):
        video = rng.random() < 0.1
        media = (
            {"video": f"videos/{rng.randrange(videos):04d}.mp4"}
            if video
            else {"image": f"images/{rng.randrange(images):05d}.jpg"}
        )
        rounds = rng.randint(2, 4) if rng.random() < 0.4 else 1
        turns = []
        for r in range(rounds):
            question = sentence(rng, 4, 16) + "?"
            if r == 0:
                question = ("<video>\n" if video else "<image>\n") + question
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": sentence(rng, 2, 30) + "."}]
        records.append({"id": f"s{i}", **media, "conversations": turns})
    data.write_text(json.dumps(records))
    print(
        f"generated {samples:,} records, {images:,} JPEGs, {videos} MP4s in {time.perf_counter() - t0:.0f} s -> {root}"
    )
    return data


def clear_store(data: Path) -> None:
    shutil.rmtree(data.parent / ".finetune-store" / data.name, ignore_errors=True)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that ended: on a shared machine the figure
    that other work does not stretch."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def train_once(data: Path, run_dir: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS GB) of a one-step training run in a fresh process."""
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        "experiment=demo",
        "logger=none",
        f"trainer.output_dir={run_dir}",
        "trainer.max_steps=1",
        f"data.train={data}",
        "data.eval=null",
        "evaluation.after_training=false",
        "data.max_length=1024",
        "trainer.packing=true",
        "trainer.per_device_train_batch_size=1",
    ]
    code = (
        "import atexit, resource, runpy, sys; sys.argv = ['finetune.train'] + sys.argv[1:]; "
        "atexit.register(lambda: print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "file=sys.stderr)); runpy.run_module('finetune.train', run_name='__main__')"
    )
    start, cpu = time.perf_counter(), cpu_seconds()
    result = subprocess.run(
        [sys.executable, "-c", code, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)},
    )
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if result.returncode:
        raise SystemExit(f"training failed:\n{result.stderr[-4000:]}")
    peak = int(re.search(r"PEAK_RSS_KB (\d+)", result.stderr).group(1))
    return wall, cpu, peak / 1024**2


def private_kb() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return int(fields["Private_Dirty"].split()[0])


def touched_in_child(samples) -> int:
    """KB of private (copy-on-write) memory a forked child gains by reading every sample."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        before = private_kb()
        n = 0
        for i in range(len(samples)):
            n += len(samples[i].messages)
        os.write(write, str(private_kb() - before).encode())
        os._exit(0)
    os.close(write)
    value = int(os.read(read, 64).decode())
    os.waitpid(pid, 0)
    return value


def commit_of(tree: Path) -> str:
    result = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return result.stdout.strip() + ("+edits" if dirty.stdout.strip() else "") if result.returncode == 0 else "?"


def compare(args, root: Path) -> None:
    """This checkout and REV measured one after the other (REV first) by this very script, then side by side."""
    import tempfile

    only = ",".join(sorted(set(args.only.split(",")) & {"1", "2"})) or "2"  # the figures compared
    keep = ["--samples", str(args.samples), "--images", str(args.images), "--videos", str(args.videos)]
    keep += ["--root", str(root), "--only", only]
    results = {}
    with tempfile.TemporaryDirectory(prefix="data_scale-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.compare],
            check=True,
            capture_output=True,
        )
        try:
            for name, where in ((args.compare, tree), ("this checkout", REPO)):
                out = Path(tmp) / f"{len(results)}.json"
                print(f"--- {name} ({where})", flush=True)
                subprocess.run([sys.executable, __file__, *keep, "--tree", str(where), "--json", str(out)], check=True)
                results[name] = json.loads(out.read_text())
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    (a, old), (b, new) = results.items()
    print(f"\n{'':38s}{old['commit']:>16s}{new['commit']:>16s}")
    rows = [
        ("start to first step, cold (s)", "cold_s", "{:.1f}"),
        ("  CPU seconds", "cold_cpu_s", "{:.1f}"),
        ("  peak RSS (GB)", "cold_rss_gb", "{:.2f}"),
        ("start to first step, warm (s)", "warm_s", "{:.1f}"),
        ("  CPU seconds", "warm_cpu_s", "{:.1f}"),
        ("  peak RSS (GB)", "warm_rss_gb", "{:.2f}"),
    ]
    for label, key, form in rows:
        if key in old and key in new:
            print(f"{label:38s}{form.format(old[key]):>16s}{form.format(new[key]):>16s}")
    for key, unit in (("rates", "samples/s"), ("cpu_rates", "samples/CPU s")):
        for procs in old.get(key, {}):
            r0, r1 = old[key][procs], new[key][procs]
            label = f"token pre-pass, {procs} proc. ({unit})"
            print(f"{label:38s}{r0:16,.0f}{r1:16,.0f}   {r1 / r0:.2f}x")
    if "counts_sha" in old:
        same = old["counts_sha"] == new["counts_sha"]
        print(f"token counts per sample: {'identical' if same else 'DIFFERENT'} (text/image/video {new['tokens']})")
        if not same:
            raise SystemExit(f"the token counts differ: {old['tokens']} at {a}")


def main() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as in every training process and pre-pass worker
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--compare", metavar="REV", help="also measure this commit, in a temporary git worktree")
    parser.add_argument("--only", default="1,2,3,4,5,6", help="the measurements to run (comma-separated numbers)")
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)  # the code measured (set by --compare)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # where a --compare child writes its figures
    args = parser.parse_args()
    only = {int(n) for n in args.only.split(",")}
    figures: dict = {"commit": commit_of(REPO)}

    from finetune.base.paths import cache_root
    from finetune.data.packing import pack_rows
    from finetune.data.prepare import prepare_split
    from finetune.data.sources import DatasetSource, read_source
    from finetune.data.store import default_num_proc, load_source
    from finetune.model.load import load_processor
    from finetune.recipe.data_settings import conversation_encoder, split_settings
    from finetune.recipe.load import load_config

    root = args.root or cache_root() / "bench" / f"data_scale-{args.samples}"
    data = generate(root, args.samples, args.images, args.videos)
    if args.compare:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average {load} (1/5/15 min)")
        compare(args, root)
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load} (1/5/15 min)")
        return
    cpus = default_num_proc()
    print(
        f"{REPO} at {figures['commit']}: {args.samples:,} samples, {cpus} CPUs; {data} ({data.stat().st_size / 1e6:.0f} MB)\n"
    )

    # 1. cold and warm start of a training process
    if 1 in only:
        clear_store(data)
        cold, cold_cpu, cold_rss = train_once(data, root / "run")
        warm, warm_cpu, warm_rss = train_once(data, root / "run")
        print(
            f"start to first step, cold (no store):  {cold:6.1f} s ({cold_cpu:.1f} CPU s)   peak RSS {cold_rss:.2f} GB"
        )
        print(
            f"start to first step, warm (store):     {warm:6.1f} s ({warm_cpu:.1f} CPU s)   peak RSS {warm_rss:.2f} GB"
        )
        figures.update(cold_s=cold, cold_cpu_s=cold_cpu, cold_rss_gb=cold_rss)
        figures.update(warm_s=warm, warm_cpu_s=warm_cpu, warm_rss_gb=warm_rss)

    config = load_config(["experiment=demo", f"data.train={data}", "data.max_length=1024"])
    encoder = conversation_encoder(load_processor(config.model), config)
    source = DatasetSource(data)

    # 2. pre-pass on 1 and N processes (reading the records is not part of it: the store is kept, counts dropped)
    if 2 in only:
        rates, cpu_rates, counts = {}, {}, {}
        for procs in sorted({1, cpus}):
            for f in (data.parent / ".finetune-store" / data.name).glob("counts-*"):
                f.unlink()
            start, cpu = time.perf_counter(), cpu_seconds()
            stored = load_source(source, encoder, num_proc=procs)
            rates[procs] = stored.counted / (time.perf_counter() - start)
            cpu_rates[procs] = stored.counted / (cpu_seconds() - cpu)
            counts[procs] = np.stack([stored.text, stored.image, stored.video]).astype(np.int64)
        assert len({c.tobytes() for c in counts.values()}) == 1, "counts differ between process counts"
        line = ", ".join(f"{p} process{'es' if p > 1 else ''} {r:,.0f} samples/s" for p, r in rates.items())
        speedup = f" ({rates[cpus] / rates[1]:.2f}x)" if cpus > 1 else ""
        print(f"token pre-pass: {line}{speedup}; identical counts")
        print(
            "  per CPU second: "
            + ", ".join(f"{p} process{'es' if p > 1 else ''} {r:,.0f}" for p, r in cpu_rates.items())
        )
        figures.update(
            rates={str(p): r for p, r in rates.items()},
            cpu_rates={str(p): r for p, r in cpu_rates.items()},
            counts_sha=hashlib.sha256(counts[1].tobytes()).hexdigest()[:16],
            tokens=counts[1].sum(axis=1).tolist(),
        )
    if args.json:
        args.json.write_text(json.dumps(figures))
    if not only & {3, 4, 5, 6}:
        return

    # 3. private memory of a forked worker that touches every sample
    split = prepare_split(str(data), split_settings(config), encoder, Path)
    store_mb = sum(Path(f).stat().st_size for f in split.cache_files) / 1024**2
    store_private = touched_in_child(split.samples) / 1024
    objects = read_source(source)[0]
    objects_private = touched_in_child(objects) / 1024
    print(
        f"forked worker touching every sample: store {store_private:.1f} MB private ({store_private / store_mb:.1%} "
        f"of the {store_mb:.0f} MB store); a list of Sample objects {objects_private:.0f} MB private"
    )
    del objects

    # 4. appending one sample
    records = json.loads(data.read_text())
    appended = root / "appended.json"
    appended.write_text(json.dumps(records))
    clear_store(appended)
    load_source(DatasetSource(appended), encoder)  # the store of the set as it was
    new = dict(
        records[1],
        id="appended",
        conversations=[
            {"from": "human", "value": "<image>\nA new question?"},
            {"from": "gpt", "value": "A new answer."},
        ],
    )
    appended.write_text(json.dumps(records + [new]))
    start = time.perf_counter()
    stored = load_source(DatasetSource(appended), encoder)
    print(f"store refresh after appending 1 sample: {time.perf_counter() - start:.1f} s ({stored.counted} counted)")

    # 5. multi-turn conversations: one render against a render per turn
    from finetune.data.conversation import Sample

    print("pre-pass of one conversation, by rounds:   one render          a render per turn")
    for rounds in (1, 4, 8, 16):
        messages = []
        for r in range(rounds):
            messages += [
                {"role": "user", "content": [{"type": "text", "text": sentence(random.Random(r), 8, 16)}]},
                {"role": "assistant", "content": [{"type": "text", "text": sentence(random.Random(-r), 8, 30)}]},
            ]
        sample = Sample("m", messages, "bench")
        n = max(20, 400 // rounds)
        timings = []
        for one_render in (True, False):
            if not one_render:  # the route a template that rewrites replies takes, and the pre-store code's only one
                encoder._segments_by_markers = lambda *args: None
            start = time.perf_counter()
            for _ in range(n):
                encoder.count_tokens(sample)
            timings.append((time.perf_counter() - start) / n * 1e6)
            encoder.__dict__.pop("_segments_by_markers", None)
        print(
            f"  {rounds:2d} rounds                      {timings[0]:7.0f} us ({timings[0] / rounds:4.0f}/round)   "
            f"{timings[1]:7.0f} us ({timings[1] / rounds:4.0f}/round)"
        )

    # 6. validate's packing estimate
    lengths = split.totals.tolist()
    start = time.perf_counter()
    rows = pack_rows(lengths, 1024, 0)
    print(
        f"packing estimate (pack_rows) of {len(lengths):,} samples: {time.perf_counter() - start:.2f} s, {len(rows):,} rows"
    )


if __name__ == "__main__":
    main()
