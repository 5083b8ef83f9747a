"""Preference pairs for the DPO demo (recipes/experiment/demo_dpo.yaml), from the SFT demo's questions: the chosen
answer is the right one, the rejected answer another option of the same task (seeded). Written in LLaMA-Factory's
ShareGPT ranking form (the conversation ends with the user's turn; `chosen` / `rejected` replies), with the same media.

    python data/demo/make_pairs.py        # writes data/demo/pairs_train.json and pairs_test.json
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
OPTIONS = {"colour": ["red", "green", "blue", "yellow"], "direction": ["left", "right", "up", "down"]}


def pairs(records: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for record in records:
        question, answer = record["messages"]
        wrong = rng.choice([o for o in OPTIONS[record["task"]] if o != answer["content"]])
        pair = {"id": record["id"], "task": record["task"], "messages": [question]}
        pair.update(chosen=answer["content"], rejected=wrong)
        for media in ("images", "videos"):
            if media in record:
                pair[media] = record[media]
        out.append(pair)
    return out


if __name__ == "__main__":
    for split, seed in (("train", 0), ("test", 1)):
        records = json.loads((HERE / f"{split}.json").read_text())
        (HERE / f"pairs_{split}.json").write_text(json.dumps(pairs(records, seed), indent=1) + "\n")
        print(f"pairs_{split}.json: {len(records)} pairs")
