"""The judge's prompt templates, loaded from YAML (``configs/self_ref_prompts.yaml``; a small
judge's variant is ``configs/judge_small.yaml``).

Two verdict formats (``JudgeSettings.verdict``):

* ``pair`` (the paper's): both responses in one request, the verdict a label (A or B). Templates
  ``judgement`` (self-reference mode) and ``direct_judgement`` (direct mode), with
  ``{principle}``, ``{response_a}``, ``{response_b}``, ``{verdict_prefix}``, ``{label_a}``,
  ``{label_b}``, and optionally ``{question}`` (the user's last message) and, in ``judgement``
  only, ``{reference}`` (the judge's own answer, quoted in the prompt).
* ``pointwise``: each response checked on its own against the judge's own answer, the verdict a
  yes/no label (``pointwise_labels``), read right after ``pointwise_prefix`` (by default the
  reply's first token) or after a critique and the verdict prefix. Templates ``pointwise`` and
  ``direct_pointwise``, with ``{principle}``, ``{response}``, ``{question}``, ``{label_yes}``,
  ``{label_no}``, ``{verdict_prefix}`` and (``pointwise`` only) ``{reference}``. A small judge
  cannot map letters to responses (its A/B verdicts are at chance), but can say whether one
  answer agrees with another.

Message layouts (the paper's structure: the judge's own answer comes before the comparison):

* self-reference, ``reference_turn: true`` (the seed system's layout): the user's conversation,
  the judge's own answer as an assistant turn, then the judgement request as a user turn;
* self-reference, ``reference_turn: false``: the earlier turns, then one user turn that holds the
  judgement request with the question and the own answer quoted (``{question}``, ``{reference}``);
  a small judge reads a quoted reference next to the responses more easily than a turn above;
* direct (the paper's baseline, no own answer): the earlier turns, then one user turn with the
  ``direct_judgement`` request (by default the question followed by the comparison request, as
  the seed's ``direct_feedback`` did).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_PROMPTS = CONFIGS / "self_ref_prompts.yaml"

# Used when a prompts file has no direct_judgement: the question, then the same request as
# self-reference mode without the words about a reference answer.
DEFAULT_DIRECT = """{question}

Two assistants answered the question above. Judge both responses under this principle: {principle}

[Response {label_a}]
{response_a}

[Response {label_b}]
{response_b}

Finish with one final line of exactly this form: "{verdict_prefix} {label_a}" or "{verdict_prefix} {label_b}"."""


DEFAULT_POINTWISE = """Another assistant answered the same question:

{response}

Use your own answer above as the reference. Is the other assistant's answer correct, helpful and harmless? Reply {label_yes} or {label_no}."""

DEFAULT_DIRECT_POINTWISE = """Question: {question}

Answer to check: {response}

Is the answer to check correct, helpful and harmless? Reply {label_yes} or {label_no}."""


@dataclass(frozen=True)
class JudgePrompts:
    principle: str
    judgement: str  # with {principle}, {response_a}, {response_b}, {verdict_prefix}; optional {question}, {reference}
    verdict_prefix: str = "Verdict:"
    labels: tuple[str, str] = ("A", "B")
    system: str = ""
    direct_judgement: str = DEFAULT_DIRECT
    reference_turn: bool = True  # the own answer as an assistant turn (False: quoted via {reference})
    pointwise: str = DEFAULT_POINTWISE
    direct_pointwise: str = DEFAULT_DIRECT_POINTWISE
    pointwise_labels: tuple[str, str] = ("Yes", "No")
    pointwise_prefix: str = ""  # the reply before the yes/no label when there is no critique

    @classmethod
    def load(cls, path: str | Path | None = None) -> "JudgePrompts":
        path = Path(path or DEFAULT_PROMPTS)
        if not path.exists() and not path.is_absolute():
            # "configs/judge_small_prompts.yaml" or "judge_small_prompts.yaml" from any directory
            path = next((p for p in (CONFIGS.parent / path, CONFIGS / path) if p.exists()), path)
        if not path.exists():
            raise ValueError(f"prompts file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of template: text")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown template key(s) {', '.join(unknown)}")
        for key in ("labels", "pointwise_labels"):
            if key in data:
                data[key] = tuple(str(x) for x in data[key]) if isinstance(data[key], (list, tuple)) else ()
                if len(data[key]) != 2 or data[key][0] == data[key][1]:
                    raise ValueError(f"{path}: {key} must be two different strings")
        if "reference_turn" in data and not isinstance(data["reference_turn"], bool):
            raise ValueError(f"{path}: reference_turn must be true or false")
        try:
            prompts = cls(**data)
            prompts.check()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return prompts

    def check(self) -> None:
        """Fail now, on a bad placeholder or a layout that would drop the own answer."""
        self.render_judgement("x", "y", question="q", reference="r")
        self.render_judgement("x", "y", question="q", direct=True)
        self.render_pointwise("x", question="q", reference="r")
        self.render_pointwise("x", question="q", direct=True)
        for name in ("judgement", "pointwise"):
            if not self.reference_turn and "{reference}" not in getattr(self, name):
                raise ValueError(f"reference_turn is false, so the {name} template must quote {{reference}}")
        for name in ("direct_judgement", "direct_pointwise"):
            if "{reference}" in getattr(self, name):
                raise ValueError(f"{name} cannot use {{reference}}: direct mode has no own answer")

    def with_system(self, messages: list[dict]) -> list[dict]:
        if not self.system or (messages and messages[0]["role"] == "system"):
            return list(messages)
        return [{"role": "system", "content": self.system}] + list(messages)

    def self_reference_messages(self, message: list[dict]) -> list[dict]:
        """Turn 1: the user's conversation, which the judge answers itself."""
        return self.with_system(message)

    def render_judgement(self, response_a: str, response_b: str, question: str = "", reference: str = "",
                         direct: bool = False) -> str:
        template = self.direct_judgement if direct else self.judgement
        try:
            return template.format(
                principle=self.principle.strip(), response_a=response_a, response_b=response_b,
                verdict_prefix=self.verdict_prefix, label_a=self.labels[0], label_b=self.labels[1],
                question=question, reference=reference,
            )
        except (KeyError, IndexError) as e:
            which = "direct_judgement" if direct else "judgement"
            raise ValueError(f"{which} template has an unknown placeholder {e}") from None

    def render_pointwise(self, response: str, question: str = "", reference: str = "", direct: bool = False) -> str:
        template = self.direct_pointwise if direct else self.pointwise
        try:
            return template.format(
                principle=self.principle.strip(), response=response, question=question, reference=reference,
                verdict_prefix=self.verdict_prefix, label_yes=self.pointwise_labels[0], label_no=self.pointwise_labels[1],
            )
        except (KeyError, IndexError) as e:
            which = "direct_pointwise" if direct else "pointwise"
            raise ValueError(f"{which} template has an unknown placeholder {e}") from None

    def _layout(self, message: list[dict], own_answer: str | None, request: str) -> list[dict]:
        if own_answer is not None and self.reference_turn:
            return self.with_system(message) + [
                {"role": "assistant", "content": own_answer}, {"role": "user", "content": request}]
        return self.with_system(message[:-1]) + [{"role": "user", "content": request}]

    def judgement_messages(self, message: list[dict], own_answer: str | None, response_a: str,
                           response_b: str) -> list[dict]:
        """Turn 2: the comparison request. ``own_answer`` None: direct mode (no reference)."""
        question = message[-1]["content"] if message else ""
        request = self.render_judgement(response_a, response_b, question, own_answer or "", direct=own_answer is None)
        return self._layout(message, own_answer, request)

    def pointwise_messages(self, message: list[dict], own_answer: str | None, response: str) -> list[dict]:
        """Turn 2 of the pointwise format: one response checked (against the own answer)."""
        question = message[-1]["content"] if message else ""
        request = self.render_pointwise(response, question, own_answer or "", direct=own_answer is None)
        return self._layout(message, own_answer, request)
