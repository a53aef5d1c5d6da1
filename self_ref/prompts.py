"""The judge's prompt templates, loaded from YAML (``configs/self_ref_prompts.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "self_ref_prompts.yaml"


@dataclass(frozen=True)
class JudgePrompts:
    principle: str
    judgement: str  # with {principle}, {response_a}, {response_b}, {verdict_prefix}
    verdict_prefix: str = "Verdict:"
    labels: tuple[str, str] = ("A", "B")
    system: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None) -> "JudgePrompts":
        path = Path(path or DEFAULT_PROMPTS)
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown template key(s) {', '.join(unknown)}")
        if "labels" in data:
            data["labels"] = tuple(data["labels"])
            if len(data["labels"]) != 2 or data["labels"][0] == data["labels"][1]:
                raise ValueError(f"{path}: labels must be two different strings")
        prompts = cls(**data)
        prompts.render_judgement("x", "y")  # fail now, naming the file, on a bad placeholder
        return prompts

    def with_system(self, messages: list[dict]) -> list[dict]:
        if not self.system or (messages and messages[0]["role"] == "system"):
            return list(messages)
        return [{"role": "system", "content": self.system}] + list(messages)

    def self_reference_messages(self, message: list[dict]) -> list[dict]:
        """Turn 1: the user's conversation, which the judge answers itself."""
        return self.with_system(message)

    def render_judgement(self, response_a: str, response_b: str) -> str:
        try:
            return self.judgement.format(
                principle=self.principle.strip(), response_a=response_a, response_b=response_b,
                verdict_prefix=self.verdict_prefix,
            )
        except (KeyError, IndexError) as e:
            raise ValueError(f"judgement template has an unknown placeholder {e}") from None

    def judgement_messages(self, message: list[dict], own_answer: str, response_a: str, response_b: str) -> list[dict]:
        """Turn 2: the conversation, the judge's own answer, then the comparison request."""
        return self.with_system(message) + [
            {"role": "assistant", "content": own_answer},
            {"role": "user", "content": self.render_judgement(response_a, response_b)},
        ]
