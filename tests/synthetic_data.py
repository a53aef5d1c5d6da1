"""Synthetic preference data with a learnable rule, written as real files for the trainers."""

import json
import random
from pathlib import Path

GOOD = "helpful clear kind honest careful accurate polite useful friendly thoughtful".split()
BAD = "rude wrong lazy vague careless false sloppy useless hostile confusing".split()
TOPICS = "weather cooking travel history science music sports money health gardens".split()


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Chosen responses use words from GOOD, rejected ones from BAD: a rule a tiny RM learns."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        message = [{"role": "user", "content": f"Tell me something about {topic}."}]
        if rng.random() < 0.2:
            message = [{"role": "system", "content": "Answer briefly."}] + message
        good = " ".join(rng.choices(GOOD, k=rng.randint(3, 12)))
        bad = " ".join(rng.choices(BAD, k=rng.randint(3, 12)))
        rows.append({"message": message, "chose": f"About {topic}: {good}.", "reject": f"About {topic}: {bad}.",
                     "margin": round(rng.uniform(0, 1), 3)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_preference_split(folder: Path, n_train: int, n_eval: int = 64, extra=None) -> tuple[Path, Path]:
    """``folder/train.jsonl`` (``n_train`` rows, seed 0; each row updated by ``extra(row)`` when
    given) and ``folder/eval.jsonl`` (``n_eval`` rows, seed 1): the trainers' train / held-out files."""
    train = [r | (extra(r) if extra else {}) for r in preference_rows(n_train, seed=0)]
    return write_jsonl(folder / "train.jsonl", train), write_jsonl(folder / "eval.jsonl", preference_rows(n_eval, seed=1))
