"""The shape of a valid row, for each kind of training data.

Each validator takes one raw record (a dict from ``rlhf_data.readers``) and returns a normalised
row, or raises ``DataError`` naming the field as the user's file spells it (``chose``,
``message[2].role``), so the error can be fixed without reading this code:

* ``validate_preference`` (reward models): ``{"message", "chosen", "rejected", "margin"}``
* ``validate_conversation`` (SFT):          ``{"messages"}``
* ``validate_prompt`` (RL prompts):         ``{"message"}``

Turns are always ``{"role": "system" | "user" | "assistant", "content": str}``; other keys of a
turn are dropped, so a row reads the same from JSON, parquet or an Arrow folder (Arrow fills
missing struct keys with nulls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rlhf_data.errors import DataError, type_name

ROLES = ("system", "user", "assistant")


def _required(record: dict, key: str) -> Any:
    if key not in record:
        present = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(None, None, key, f"missing (the row has keys: {present})")
    return record[key]


def _text(value: Any, field: str) -> str:
    """A non-empty string; wrong type, empty and blank each say which they are."""
    if not isinstance(value, str):
        raise DataError(None, None, field, f"expected a non-empty string, got {type_name(value)}")
    if not value:
        raise DataError(None, None, field, "expected a non-empty string, got an empty string")
    if not value.strip():
        raise DataError(None, None, field, "expected a non-empty string, got only whitespace")
    return value


def _turns(value: Any, field: str) -> list[dict[str, str]]:
    """A non-empty list of turns; a system turn may only come first."""
    if not isinstance(value, (list, tuple)):
        raise DataError(None, None, field, f"expected a list of turns or a string, got {type_name(value)}")
    if not value:
        raise DataError(None, None, field, "expected at least one turn, got an empty list")
    turns = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(None, None, where, f"expected a turn {{role, content}}, got {type_name(turn)}")
        role = turn.get("role")
        if role is None:  # absent in JSON, null in Arrow: the same mistake
            raise DataError(None, None, f"{where}.role", "missing (expected one of system, user, assistant)")
        if role not in ROLES:
            got = repr(role) if isinstance(role, str) else type_name(role)
            raise DataError(None, None, f"{where}.role", f"expected one of system, user, assistant, got {got}")
        if role == "system" and i > 0:
            raise DataError(None, None, f"{where}.role", "a system turn may only be the first turn")
        if "content" not in turn:
            raise DataError(None, None, f"{where}.content", "missing")
        turns.append({"role": role, "content": _text(turn["content"], f"{where}.content")})
    return turns


def _prompt_turns(value: Any, field: str) -> list[dict[str, str]]:
    """A prompt: a plain string (one user turn) or turns that end with a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, field)}]
    turns = _turns(value, field)
    if turns[-1]["role"] != "user":
        raise DataError(None, None, field, f"a prompt must end with a user turn, ends with {turns[-1]['role']}")
    return turns


@dataclass(frozen=True)
class PreferenceKeys:
    """Which keys of a record hold what (the seed system's ``--prompt_key`` ... flags)."""

    prompt_key: str = "message"
    chosen_key: str = "chose"
    rejected_key: str = "reject"
    margin_key: str = "margin"


def validate_preference(record: dict, keys: PreferenceKeys = PreferenceKeys()) -> dict:
    """A reward-model pair: ``{"message": turns, "chosen": str, "rejected": str, "margin": float}``.

    The margin (preference strength) is 0.0 when its key is absent or null; otherwise it must be a
    finite number, since one NaN margin would turn the whole reward-model loss into NaN.
    """
    message = _prompt_turns(_required(record, keys.prompt_key), keys.prompt_key)
    chosen = _text(_required(record, keys.chosen_key), keys.chosen_key)
    rejected = _text(_required(record, keys.rejected_key), keys.rejected_key)
    if chosen == rejected:
        raise DataError(None, None, keys.rejected_key, f"the same text as {keys.chosen_key!r}: a pair must differ")
    margin = record.get(keys.margin_key)
    if margin is None:
        margin = 0.0
    elif isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError(None, None, keys.margin_key, f"expected a finite number, got {type_name(margin)}")
    elif not math.isfinite(margin):
        raise DataError(None, None, keys.margin_key, f"expected a finite number, got {margin}")
    return {"message": message, "chosen": chosen, "rejected": rejected, "margin": float(margin)}


def validate_conversation(record: dict, key: str = "messages") -> dict:
    """An SFT conversation: ``{"messages": turns}`` ending with the assistant turn to learn."""
    turns = _turns(_required(record, key), key)
    if turns[-1]["role"] != "assistant":
        ends = turns[-1]["role"]
        raise DataError(None, None, key, f"a conversation must end with an assistant turn, ends with {ends}")
    return {"messages": turns}


def validate_prompt(record: dict, key: str = "message") -> dict:
    """An RL prompt (``--input_key``): ``{"message": turns}`` ending with a user turn."""
    return {"message": _prompt_turns(_required(record, key), key)}


def validate_response_pair(record: dict, message_key: str = "message", responses_key: str = "responses") -> dict:
    """Two candidate responses to judge: ``{"message": turns, "responses": [str, str]}`` (plus the
    row's ``id`` when it has a string one)."""
    message = _prompt_turns(_required(record, message_key), message_key)
    responses = _required(record, responses_key)
    if not isinstance(responses, (list, tuple)) or len(responses) != 2:
        got = f"{len(responses)} items" if isinstance(responses, (list, tuple)) else type_name(responses)
        raise DataError(None, None, responses_key, f"expected a list of two responses, got {got}")
    pair = [_text(r, f"{responses_key}[{i}]") for i, r in enumerate(responses)]
    out = {"message": message, "responses": pair}
    if isinstance(record.get("id"), str) and record["id"]:
        out["id"] = record["id"]
    return out
