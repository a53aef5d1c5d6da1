"""Reading the verdict out of a judgement text."""

from __future__ import annotations

import re

from self_ref.prompts import JudgePrompts


def _verdict_pattern(prompts: JudgePrompts, labels: tuple[str, ...] | None = None) -> re.Pattern:
    labels = "|".join(re.escape(label) for label in (labels or prompts.labels))
    prefix = re.escape(prompts.verdict_prefix.rstrip(":").strip())
    # "Verdict: A", "verdict : [B]", "**Verdict:** A", "Verdict: Response A"
    return re.compile(rf"{prefix}\W*:?\W*(?:response\s+)?({labels})(?![\w])", re.IGNORECASE)


def parse_verdict(text: str, prompts: JudgePrompts, labels: tuple[str, ...] | None = None) -> int | None:
    """0 if the judge prefers response A, 1 for B, None if there is no verdict line (with
    ``labels``, e.g. the pointwise check's ("Yes", "No"): the index of the label found).

    The last verdict in the text counts (a critique may quote the format before concluding).
    A label counts only right after the verdict prefix, so "a" in prose is never read as one.
    """
    labels = labels or prompts.labels
    matches = list(_verdict_pattern(prompts, labels).finditer(text or ""))
    if not matches:
        return None
    label = matches[-1].group(1)
    for i, candidate in enumerate(labels):
        if label.lower() == candidate.lower():
            return i
    return None


def verdict_prefix_end(text: str, prompts: JudgePrompts) -> int | None:
    """Index just after the last verdict prefix (e.g. after "Verdict:"), where the label starts;
    None if the text has no prefix. Used to score the label tokens with the judge's log-probs."""
    idx = (text or "").rfind(prompts.verdict_prefix)
    return None if idx < 0 else idx + len(prompts.verdict_prefix)
