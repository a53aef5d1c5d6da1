#!/usr/bin/env python3
"""Validate the hand-written data files in data/ (standard library only).

    python data/check_data.py [--data-dir data] [--threshold 0.6] [--max-answer-words 70]

Checks
  * prompts_train.jsonl / prompts_heldout.jsonl: one JSON object per line with exactly
    {"id", "message", "category"}; ids "train-NNNN" / "heldout-NNNN", unique; "message" is a list
    of {"role", "content"} turns ending with a user turn; category in the fixed set; row counts
    at least the minimums; every category present in both files, train and held-out category
    shares within a few percentage points, and "decline" kept to a small share.
  * sft_chat.jsonl: one JSON object per line with exactly {"messages"}; user/assistant turns that
    alternate, start with the user and end with the assistant; assistant answers short (word limit)
    and without markdown headers; at least the minimum number of rows.
  * Overlap, over the user turns of all three files (plus data/judge_truth_set.jsonl when it
    exists; that file is someone else's, so its rows are only read, not validated): no exact
    duplicates after normalising case, punctuation and whitespace, and no near-duplicates, i.e.
    no two prompts whose word sets have Jaccard similarity >= the threshold. Pairs inside the
    judge file alone are listed for information and do not fail the check.

Exit status 0 when everything passes, 1 when any check fails (the problems are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from itertools import combinations

CATEGORIES = ("fact", "definition", "howto", "advice", "list", "explain", "writing", "math", "safety", "decline")
ROLES = ("system", "user", "assistant")
MIN_ROWS = {"prompts_train.jsonl": 400, "prompts_heldout.jsonl": 120, "sft_chat.jsonl": 240}
ID_PREFIX = {"prompts_train.jsonl": "train", "prompts_heldout.jsonl": "heldout"}
JUDGE_FILE = "judge_truth_set.jsonl"
SHARE_TOLERANCE = 0.03          # train vs held-out share of each category, absolute
DECLINE_SHARE = (0.03, 0.08)    # allowed share of "decline" prompts in each prompt file
LONG_PROMPT_CHARS = 200         # prompts longer than this get a warning (they should be short)

_WORD = re.compile(r"[^\W_]+")
_HEADER = re.compile(r"^\s{0,3}#{1,6}\s", re.MULTILINE)


class Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def warn(self, where: str, msg: str) -> None:
        self.warnings.append(f"{where}: {msg}")


def words(text: str) -> list[str]:
    """Lower-cased words; apostrophes dropped ("don't" -> "dont"), other punctuation splits."""
    text = text.lower().replace("\u2019", "'").replace("'", "")
    return _WORD.findall(text)


def normalise(text: str) -> str:
    return " ".join(words(text))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def read_jsonl(path: str, rep: Report, strict: bool = True):
    """Yield (line_no, obj) for each object line; problems go to errors (strict) or warnings."""
    report = rep.error if strict else rep.warn
    name = os.path.basename(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{name}:{line_no}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                report(where, "not valid UTF-8")
                continue
            if not text.strip():
                report(where, "blank line")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                report(where, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                report(where, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield line_no, obj


def check_turns(turns, where: str, rep: Report) -> bool:
    if not isinstance(turns, list) or not turns:
        rep.error(where, "expected a non-empty list of turns")
        return False
    ok = True
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or set(t) != {"role", "content"}:
            rep.error(where, f"turn {i}: expected exactly {{'role', 'content'}}")
            ok = False
            continue
        if t["role"] not in ROLES:
            rep.error(where, f"turn {i}: unknown role {t['role']!r}")
            ok = False
        c = t["content"]
        if not isinstance(c, str) or not c.strip():
            rep.error(where, f"turn {i}: content must be a non-empty string")
            ok = False
        elif c != c.strip():
            rep.error(where, f"turn {i}: content has leading/trailing whitespace")
            ok = False
    return ok


def user_text(turns) -> str:
    return " ".join(t["content"] for t in turns if isinstance(t, dict) and t.get("role") == "user"
                    and isinstance(t.get("content"), str))


def check_prompt_file(path: str, rep: Report, items: list) -> Counter:
    name = os.path.basename(path)
    prefix = ID_PREFIX[name]
    id_re = re.compile(rf"^{prefix}-\d{{4,}}$")
    seen_ids: dict[str, int] = {}
    cats: Counter = Counter()
    rows = 0
    for line_no, obj in read_jsonl(path, rep):
        rows += 1
        where = f"{name}:{line_no}"
        if set(obj) != {"id", "message", "category"}:
            rep.error(where, f"keys {sorted(obj)}; expected ['category', 'id', 'message']")
        rid = obj.get("id")
        if not isinstance(rid, str) or not id_re.match(rid):
            rep.error(where, f"id {rid!r} does not look like '{prefix}-0001'")
        elif rid in seen_ids:
            rep.error(where, f"id {rid} already used on line {seen_ids[rid]}")
        else:
            seen_ids[rid] = line_no
        cat = obj.get("category")
        if cat not in CATEGORIES:
            rep.error(where, f"category {cat!r} not one of {', '.join(CATEGORIES)}")
        else:
            cats[cat] += 1
        msg = obj.get("message")
        if check_turns(msg, where, rep):
            if msg[-1]["role"] != "user":
                rep.error(where, "the message must end with a user turn")
            if len(msg) != 1:
                rep.warn(where, f"{len(msg)} turns; these files use one user turn per prompt")
            text = user_text(msg)
            if len(text) > LONG_PROMPT_CHARS:
                rep.warn(where, f"long prompt ({len(text)} characters)")
            items.append((name, rid if isinstance(rid, str) else f"line {line_no}", text))
    expected = [f"{prefix}-{i:04d}" for i in range(1, rows + 1)]
    if sorted(seen_ids) != expected and len(seen_ids) == rows:
        rep.warn(name, f"ids are not numbered {prefix}-0001..{prefix}-{rows:04d} without gaps")
    if rows < MIN_ROWS[name]:
        rep.error(name, f"{rows} rows, need at least {MIN_ROWS[name]}")
    cats["_rows"] = rows
    return cats


def check_sft_file(path: str, rep: Report, items: list, max_words: int) -> dict:
    name = os.path.basename(path)
    rows = 0
    answer_words: list[int] = []
    for line_no, obj in read_jsonl(path, rep):
        rows += 1
        where = f"{name}:{line_no}"
        if set(obj) != {"messages"}:
            rep.error(where, f"keys {sorted(obj)}; expected ['messages']")
        turns = obj.get("messages")
        if not check_turns(turns, where, rep):
            continue
        body = turns[1:] if turns[0]["role"] == "system" else turns
        roles = [t["role"] for t in body]
        if len(body) < 2 or roles[0] != "user" or roles[-1] != "assistant" or any(
                r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
            rep.error(where, f"turns must alternate user/assistant, starting with user and ending with "
                             f"assistant; got {roles}")
        for t in body:
            if t["role"] != "assistant":
                continue
            n = len(t["content"].split())
            answer_words.append(n)
            if n > max_words:
                rep.error(where, f"assistant answer has {n} words (limit {max_words})")
            if _HEADER.search(t["content"]):
                rep.error(where, "assistant answer contains a markdown header")
        items.append((name, f"line {line_no}", user_text(body)))
    if rows < MIN_ROWS[name]:
        rep.error(name, f"{rows} rows, need at least {MIN_ROWS[name]}")
    return {"rows": rows, "answer_words": answer_words}


def read_judge_file(path: str, rep: Report, items: list) -> int:
    """Someone else's file: take the user turns of each row, tolerate and report odd rows."""
    name = os.path.basename(path)
    n = 0
    for line_no, obj in read_jsonl(path, rep, strict=False):
        where = f"{name}:{line_no}"
        msg = obj.get("message", obj.get("messages", obj.get("prompt", obj.get("question"))))
        if isinstance(msg, str):
            text = msg
        elif isinstance(msg, list):
            text = user_text(msg)
        else:
            text = ""
        if not text.strip():
            rep.warn(where, "no user text found (looked at message/messages/prompt/question); row skipped")
            continue
        rid = obj.get("id")
        items.append((name, rid if isinstance(rid, str) else f"line {line_no}", text))
        n += 1
    return n


def overlap_checks(items: list, rep: Report, threshold: float) -> dict:
    """Exact duplicates (normalised) and near-duplicates (word-set Jaccard) over all user turns."""
    normed = [normalise(t) for _, _, t in items]
    sets = [frozenset(words(t)) for _, _, t in items]
    exact, near, judge_only = [], [], []
    for i, j in combinations(range(len(items)), 2):
        a, b = items[i], items[j]
        both_judge = a[0] == JUDGE_FILE and b[0] == JUDGE_FILE
        if normed[i] == normed[j]:
            (judge_only if both_judge else exact).append((1.0, a, b))
            continue
        s = jaccard(sets[i], sets[j])
        if s >= threshold:
            (judge_only if both_judge else near).append((s, a, b))
    fmt = lambda x: f"{x[0]} {x[1]}: {x[2]!r}"
    for s, a, b in exact:
        rep.error("exact duplicate", f"{fmt(a)}  ==  {fmt(b)}")
    for s, a, b in sorted(near, key=lambda p: -p[0]):
        rep.error(f"near-duplicate (Jaccard {s:.2f})", f"{fmt(a)}  ~  {fmt(b)}")
    for s, a, b in judge_only:
        rep.warn(f"inside {JUDGE_FILE} (Jaccard {s:.2f}, not ours to fix)", f"{fmt(a)}  ~  {fmt(b)}")
    top = 0.0
    for i, j in combinations(range(len(items)), 2):
        if items[i][0] == JUDGE_FILE and items[j][0] == JUDGE_FILE:
            continue
        top = max(top, jaccard(sets[i], sets[j]))
    return {"pairs": len(items) * (len(items) - 1) // 2, "exact": len(exact), "near": len(near),
            "max_similarity": top}


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=here, help="folder holding the files (default: this script's folder)")
    ap.add_argument("--threshold", type=float, default=0.6, help="Jaccard similarity that counts as near-duplicate")
    ap.add_argument("--max-answer-words", type=int, default=70, help="word limit for SFT assistant answers")
    args = ap.parse_args(argv)

    rep = Report()
    items: list = []
    cat_counts: dict[str, Counter] = {}
    sft_info = None
    for name in ("prompts_train.jsonl", "prompts_heldout.jsonl", "sft_chat.jsonl"):
        path = os.path.join(args.data_dir, name)
        if not os.path.isfile(path):
            rep.error(name, "missing")
            continue
        if name == "sft_chat.jsonl":
            sft_info = check_sft_file(path, rep, items, args.max_answer_words)
        else:
            cat_counts[name] = check_prompt_file(path, rep, items)

    judge_path = os.path.join(args.data_dir, JUDGE_FILE)
    judge_rows = read_judge_file(judge_path, rep, items) if os.path.isfile(judge_path) else None

    # Category mix: present in both prompt files, similar shares, a small share of declines.
    tr, ho = cat_counts.get("prompts_train.jsonl"), cat_counts.get("prompts_heldout.jsonl")
    if tr and ho and tr["_rows"] and ho["_rows"]:
        for c in CATEGORIES:
            st, sh = tr[c] / tr["_rows"], ho[c] / ho["_rows"]
            if not tr[c] or not ho[c]:
                rep.error("categories", f"{c!r} missing from {'train' if not tr[c] else 'held-out'} prompts")
            elif abs(st - sh) > SHARE_TOLERANCE:
                rep.error("categories", f"{c!r} is {st:.1%} of train but {sh:.1%} of held-out "
                                        f"(tolerance {SHARE_TOLERANCE:.0%})")
        for name, cc in (("prompts_train.jsonl", tr), ("prompts_heldout.jsonl", ho)):
            share = cc["decline"] / cc["_rows"]
            if not DECLINE_SHARE[0] <= share <= DECLINE_SHARE[1]:
                rep.error(name, f"decline share {share:.1%} outside {DECLINE_SHARE[0]:.0%}-{DECLINE_SHARE[1]:.0%}")

    ov = overlap_checks(items, rep, args.threshold)

    # Summary.
    print("== data check ==")
    if tr is not None or ho is not None:
        print(f"{'category':<12}{'train':>8}{'share':>8}{'heldout':>9}{'share':>8}")
        for c in CATEGORIES:
            t = tr[c] if tr else 0
            h = ho[c] if ho else 0
            ts = f"{t / tr['_rows']:.1%}" if tr and tr["_rows"] else "-"
            hs = f"{h / ho['_rows']:.1%}" if ho and ho["_rows"] else "-"
            print(f"{c:<12}{t:>8}{ts:>8}{h:>9}{hs:>8}")
        print(f"{'total':<12}{tr['_rows'] if tr else 0:>8}{'':>8}{ho['_rows'] if ho else 0:>9}")
    if sft_info is not None:
        aw = sft_info["answer_words"]
        if aw:
            print(f"sft_chat.jsonl: {sft_info['rows']} conversations; assistant answer words "
                  f"min {min(aw)} / mean {sum(aw) / len(aw):.1f} / max {max(aw)} (limit {args.max_answer_words})")
        else:
            print(f"sft_chat.jsonl: {sft_info['rows']} conversations")
    print(f"{JUDGE_FILE}: " + (f"{judge_rows} rows included in the overlap check" if judge_rows is not None
                               else "absent (not checked)"))
    print(f"overlap: {len(items)} user prompts, {ov['pairs']} pairs; exact duplicates {ov['exact']}, "
          f"near-duplicates (Jaccard >= {args.threshold}) {ov['near']}; "
          f"highest similarity in a checked pair {ov['max_similarity']:.2f}")
    for w in rep.warnings:
        print(f"WARNING {w}")
    for e in rep.errors:
        print(f"ERROR {e}")
    print(f"result: {'FAILED' if rep.errors else 'OK'} ({len(rep.errors)} errors, {len(rep.warnings)} warnings)")
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
