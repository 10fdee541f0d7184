"""Two tasks on the same sentences, so only the task id tells the model what to answer:
'sentiment' (positive/negative) and 'flip' (the opposite label). Writes train.jsonl / eval.jsonl.

python examples/multitask/make_data.py
"""

import json
import sys
from pathlib import Path

here = Path(__file__).parent
sys.path.insert(0, str(here.parent / "sentiment"))
from make_data import FILMS, make  # noqa: E402

FLIP = "Reply with the opposite of this review's sentiment, one lowercase word: positive or negative."
OPPOSITE = {"positive": "negative", "negative": "positive"}

if __name__ == "__main__":
    for name, rows in [("train.jsonl", make(240, FILMS[:22], 0)), ("eval.jsonl", make(50, FILMS[22:], 1))]:
        out = []
        for row in rows:
            out.append({**row, "task": "sentiment"})
            out.append({**row, "instruction": FLIP, "output": OPPOSITE[row["output"]], "task": "flip"})
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in out))
        print(f"wrote {len(out)} rows to {here / name}")
