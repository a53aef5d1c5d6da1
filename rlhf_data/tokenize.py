"""Chat-templated tokenization of (prompt, response) samples with EOS-preserving truncation.

The prompt is the tokenizer's chat template over ``message`` with the generation prompt; the
response is what the template adds for one more assistant turn. Both are tokenized separately so
the boundary (``prompt_len``) is exact, which the LM loss on response tokens and the RL masks need.

**The canonical end of a scored response** (``end_response``, the one place it is decided): a
response a reward model reads ends with exactly one end-of-turn token (the tokenizer's EOS) and
nothing after it. Everything after the first end-of-turn token is dropped (ChatML templates put
``"\\n"`` after ``<|im_end|>``; a sampler stops at ``<|im_end|>`` and never produces it), and a
response without one (cut at a length limit, or a template that does not close assistant turns
with EOS) gets it appended. Reward-model training (``tokenize_prompt_response``) and RL scoring
(``rl.trainer.reward_inputs``) both call it, so the position an RM is trained to read its score at
is the position RL reads it at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rlhf_data.errors import DataError


@dataclass
class TokenizedSample:
    input_ids: list[int]
    prompt_len: int  # tokens [0, prompt_len) are the prompt; the rest is the response
    truncated: bool


def render_chat(tokenizer, message: list[dict], response: str | None = None) -> tuple[str, str]:
    """(prompt text, response text) under the tokenizer's chat template."""
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "set one (tokenizer.chat_template) or pass a model folder whose tokenizer has one"
        )
    prompt = tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    if response is None:
        return prompt, ""
    full = tokenizer.apply_chat_template(
        message + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template does not render the prompt as a prefix of prompt + response; "
            "cannot locate the response tokens with this template"
        )
    return prompt, full[len(prompt):]


def render_prompt_ids(tokenizer, message: list[dict]) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the generation prompt (the assistant
    turn's opening), as a sampler is given it."""
    ids = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def truncate_prompt(ids: Sequence[int], max_len: int, bos_token_id: int | None) -> tuple[list[int], bool]:
    """Left truncation to ``max_len`` tokens (the end of a prompt, with the generation prompt, is
    what the response follows), keeping the first token when it is BOS; returns ``(ids, truncated)``.
    The one truncation rule of every sampler: the rollout engines and ``self_ref.generate``."""
    ids = [int(t) for t in ids]
    if len(ids) <= max_len:
        return ids, False
    if bos_token_id is not None and ids and ids[0] == bos_token_id and max_len >= 2:
        return [ids[0]] + ids[len(ids) - (max_len - 1):], True
    return ids[len(ids) - max_len:], True


def end_of_turn(ids: Sequence[int], end_token_id: int) -> int | None:
    """Length of ``ids`` up to and including its first ``end_token_id``; None when absent."""
    for i, t in enumerate(ids):
        if t == end_token_id:
            return i + 1
    return None


def end_response(response_ids: Sequence[int], end_token_id: int) -> tuple[list[int], bool]:
    """The canonical end of a scored response: ``(ids, ended)``.

    ``ids`` are ``response_ids`` up to and including the first ``end_token_id``, or, when there is
    none, ``response_ids + [end_token_id]``; ``ended`` says whether the response had the token
    itself (False: it was cut, or the template does not end assistant turns with it; RL's
    ``--missing_eos_penalty`` applies to those). The policy's log-probs are never computed over an
    appended token: only reward models read these ids.
    """
    if end_token_id is None:
        raise ValueError("the tokenizer has no EOS token; a scored response must end with an end-of-turn token")
    ids = [int(t) for t in response_ids]
    end = end_of_turn(ids, end_token_id)
    if end is not None:
        return ids[:end], True
    return ids + [int(end_token_id)], False


def tokenize_prompt_response(
    tokenizer, message: list[dict], response: str, max_len: int, source: str = "", row: int = 0
) -> TokenizedSample:
    """Token ids of prompt + response, at most ``max_len``, the response ending as
    ``end_response`` defines (one EOS, nothing after it).

    Truncation: first drop prompt tokens from the left (keeping a leading BOS) down to half of
    ``max_len``; if still too long, cut the response from the right and end it with EOS again
    (``end_response`` of the cut tokens), so a reward model reads a cut response exactly as RL
    scores a response cut at its length limit.
    """
    prompt, response_text = render_chat(tokenizer, message, response)
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if not response_ids:
        raise DataError(source, row, "response", "renders to no tokens")
    response_ids, _ = end_response(response_ids, eos)

    truncated = len(prompt_ids) + len(response_ids) > max_len
    if truncated:
        keep_bos = bool(prompt_ids) and prompt_ids[0] == tokenizer.bos_token_id
        prompt_budget = max(max_len - len(response_ids), min(len(prompt_ids), max_len // 2))
        if len(prompt_ids) > prompt_budget:
            tail = prompt_ids[len(prompt_ids) - (prompt_budget - keep_bos):] if prompt_budget > keep_bos else []
            prompt_ids = ([prompt_ids[0]] if keep_bos else []) + tail
        room = max_len - len(prompt_ids)
        if len(response_ids) > room:
            response_ids, _ = end_response(response_ids[: room - 1], eos)
    return TokenizedSample(prompt_ids + response_ids, len(prompt_ids), truncated)


@dataclass
class PreferencePair:
    chosen: list[int]
    chosen_prompt_len: int
    rejected: list[int]
    rejected_prompt_len: int
    margin: float
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


def tokenize_preference(tokenizer, row: dict, max_len: int) -> PreferencePair:
    """A validated preference row (``rlhf_data.schema.validate_preference``) -> token ids."""
    where = {"source": row.get("_source", ""), "row": row.get("_row", 0)}
    chosen = tokenize_prompt_response(tokenizer, row["message"], row["chosen"], max_len, **where)
    rejected = tokenize_prompt_response(tokenizer, row["message"], row["rejected"], max_len, **where)
    return PreferencePair(
        chosen.input_ids, chosen.prompt_len, rejected.input_ids, rejected.prompt_len,
        float(row.get("margin", 0.0)), chosen.truncated or rejected.truncated,
    )


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    loss_mask: list[bool]  # True on assistant tokens (content and the EOS that ends the turn)
    truncated: bool


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int, source: str = "", row: int = 0) -> TokenizedConversation:
    """Chat-templated ids of a whole conversation with a mask selecting what the assistant says.

    The template is rendered turn by turn: the text before each assistant turn (its header
    included, via ``add_generation_prompt``) is context, the text the turn adds is trained on up to
    and including its end-of-turn token (EOS); what the template puts after that token (ChatML's
    ``"\\n"``) is context, as a sampler stops at the token and never produces it. The mask is
    computed from positions, never from ``!= pad_token_id`` (which would drop the end-of-turn
    token where pad == eos, as in SmolLM2). Each piece is tokenized on its own so the mask follows
    the text exactly. Longer than ``max_len``: cut from the right (the first turns are kept).
    """
    ids: list[int] = []
    mask: list[bool] = []
    rendered = ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        context, reply = render_chat(tokenizer, messages[:i], turn["content"])
        if not context.startswith(rendered):
            raise DataError(source, row, f"messages[{i}]", "the chat template re-renders earlier turns differently; cannot mask per turn")
        context_ids = tokenizer(context[len(rendered):], add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        end = end_of_turn(reply_ids, tokenizer.eos_token_id)
        trained = len(reply_ids) if end is None else end  # no EOS in the turn: all of it, as before
        ids += context_ids + reply_ids
        mask += [False] * len(context_ids) + [True] * trained + [False] * (len(reply_ids) - trained)
        rendered = context + reply
    truncated = len(ids) > max_len
    return TokenizedConversation(ids[:max_len], mask[:max_len], truncated)


def tokenize_rows(rows: list[dict], tokenize, unusable, field: str, skip_bad_rows: bool) -> tuple[list, list[DataError]]:
    """``tokenize(row)`` for every validated row, refusing samples that would train nothing.

    ``unusable(sample)`` returns why a tokenized sample teaches the model nothing (an SFT row whose
    assistant tokens all fall beyond ``--max_len``; a pair whose two sides are the same tokens),
    or None. Such a row is an error at its file and row, or, with ``skip_bad_rows``, left out and
    returned in the skip list for the caller to count: never a silent zero-loss step.
    """
    samples, skipped = [], []
    for row in rows:
        sample = tokenize(row)
        reason = unusable(sample)
        if reason is None:
            samples.append(sample)
            continue
        err = DataError(row.get("_source"), row.get("_row"), field, reason)
        if not skip_bad_rows:
            raise err
        skipped.append(err)
    return samples, skipped


def tokenize_train_eval(train_rows: list[dict], eval_rows: list[dict], tokenize, unusable, field: str,
                        skip_bad_rows: bool, log=print) -> tuple[list, list]:
    """``tokenize_rows`` over the training and the eval rows; logs what was skipped."""
    out = []
    for name, rows in (("training", train_rows), ("eval", eval_rows)):
        samples, skipped = tokenize_rows(rows, tokenize, unusable, field, skip_bad_rows)
        if skipped:
            from rlhf_data.errors import SkipReport

            log(f"[data] {name}: " + SkipReport(len(rows), len(samples), skipped).summary())
        out.append(samples)
    return out[0], out[1]
