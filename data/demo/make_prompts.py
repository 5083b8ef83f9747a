"""RL prompts for the GRPO demo (recipes/experiment/demo_grpo.yaml), from the SFT demo's questions: the conversation
ends with the user's question (its image or video), and the SFT answer becomes the `solution` the rewards score a
completion against; `task` (colour or direction) is handed to the rewards as an extra column.

    python data/demo/make_prompts.py        # writes data/demo/prompts_train.json and prompts_test.json

prompts_test.json holds the first TEST_PROMPTS test samples (images and videos, both tasks): the held-out prompts the
demo scores during training (evaluation.steps), small enough to cost the demo little time.
"""

import json
from pathlib import Path

HERE = Path(__file__).parent
TEST_PROMPTS = 32


def prompts(records: list[dict]) -> list[dict]:
    out = []
    for record in records:
        question, answer = record["messages"]
        prompt = {"id": record["id"], "task": record["task"], "messages": [question], "solution": answer["content"]}
        for media in ("images", "videos"):
            if media in record:
                prompt[media] = record[media]
        out.append(prompt)
    return out


if __name__ == "__main__":
    for split, limit in (("train", None), ("test", TEST_PROMPTS)):
        records = json.loads((HERE / f"{split}.json").read_text())[:limit]
        (HERE / f"prompts_{split}.json").write_text(json.dumps(prompts(records), indent=1) + "\n")
        print(f"prompts_{split}.json: {len(records)} prompts")
