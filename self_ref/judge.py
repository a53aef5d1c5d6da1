"""The self-reference judgement of one pair (arXiv 2406.11190, section 3):

1. the judge answers the user's last question itself (its *reference* answer);
2. with that answer in the conversation, it critiques responses A and B under one general
   principle and ends with a verdict line; this is asked ``num_votes`` times, alternating the
   order (A/B = 1/2, then 2/1) so that position bias cancels;
3. each vote's strength is the judge's probability of label A versus B at the verdict, from
   its token log-probabilities, in this order of preference:
   ``score``: both labels scored as the continuation of the judge's own critique (vLLM's
   ``continue_final_message`` + ``prompt_logprobs``; exact, even when the text has no verdict);
   ``top_logprobs``: the labels' entries among the top log-probs of the generated verdict token;
   ``text``: the parsed verdict only (probability 1 or 0).
Unparsable text is re-asked (``max_parse_retries``, at ``retry_temperature``), then the vote is
counted as unusable and its raw text kept. ``self_ref.votes`` turns the votes into the label.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from self_ref.client import OpenAIClient
from self_ref.prompts import JudgePrompts
from self_ref.verdict import parse_verdict, verdict_prefix_end
from self_ref.votes import Vote, aggregate_votes, sigmoid


@dataclass(frozen=True)
class JudgeSettings:
    num_votes: int = 2
    min_agreement: float = 0.5
    temperature: float = 0.0
    retry_temperature: float = 0.7
    max_tokens: int = 512
    reference_max_tokens: int = 512
    max_parse_retries: int = 2
    top_logprobs: int = 20
    seed: int = 0


def request_seed(messages: list[dict], seed: int, attempt: int) -> int:
    """A sampling seed fixed by the request's content: the same judgement request gets the same
    answer whichever pair, order or run it comes from (re-asks after unparsable text sample)."""
    digest = hashlib.sha256(json.dumps([seed, attempt, messages], sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def p_a_from_top_logprobs(choice: dict, prompts: JudgePrompts) -> float | None:
    """P(A) / (P(A) + P(B)) from the top log-probs of the token generated right after the verdict
    prefix; a label missing from the top-k gets the smallest listed log-prob (an upper bound)."""
    content = (choice.get("logprobs") or {}).get("content") or []
    text = ""
    for entry in content:
        if prompts.verdict_prefix in text and text.rstrip().endswith(prompts.verdict_prefix.rstrip()):
            top = {t["token"].strip(): t["logprob"] for t in entry.get("top_logprobs") or []}
            la, lb = (top.get(label) for label in prompts.labels)
            if la is None and lb is None:
                return None
            floor = min(top.values())
            return sigmoid((la if la is not None else floor) - (lb if lb is not None else floor))
        text += entry.get("token", "")
    return None


async def _vote(client: OpenAIClient, prompts: JudgePrompts, settings: JudgeSettings,
                message: list[dict], own_answer: str, responses: list[str], k: int) -> tuple[Vote, dict]:
    swapped = k % 2 == 1
    shown = (responses[1], responses[0]) if swapped else (responses[0], responses[1])
    messages = prompts.judgement_messages(message, own_answer, *shown)
    want_top = client.supports_scoring is False
    attempts = []
    for attempt in range(settings.max_parse_retries + 1):
        params = {"max_tokens": settings.max_tokens, "seed": request_seed(messages, settings.seed, attempt),
                  "temperature": settings.temperature if attempt == 0 else settings.retry_temperature}
        if want_top:
            params |= {"logprobs": True, "top_logprobs": settings.top_logprobs}
        choice = await client.chat(messages, **params)
        text = choice["message"]["content"]
        attempts.append(text)
        verdict = parse_verdict(text, prompts)
        if verdict is not None:
            break

    p_a, source = None, "text"
    cut = verdict_prefix_end(text, prompts)
    prefix = text[:cut] if cut is not None else text.rstrip() + "\n" + prompts.verdict_prefix
    # the prefix ends with the verdict prefix, which alone decides how the labels tokenize after it
    scores = await client.score_continuations(messages, prefix, [" " + label for label in prompts.labels],
                                              tail_chars=len(prompts.verdict_prefix))
    if scores is not None:
        p_a, source = sigmoid(scores[0] - scores[1]), "score"
    else:
        if not want_top:  # learned just now that the server cannot score: ask with top log-probs
            choice = await client.chat(messages, **params, logprobs=True, top_logprobs=settings.top_logprobs)
        top = p_a_from_top_logprobs(choice, prompts)
        if top is not None:
            p_a, source = top, "top_logprobs"
    vote = Vote(swapped, verdict, p_a)
    record = {
        "order": "BA" if swapped else "AB",
        "verdict": None if verdict is None else prompts.labels[verdict],
        "p_a": p_a, "p_first": vote.p_first, "source": source, "text": text,
    }
    if len(attempts) > 1:
        record["unparsable_attempts"] = attempts[:-1] if verdict is not None else attempts
    return vote, record


async def judge_pair(client: OpenAIClient, prompts: JudgePrompts, settings: JudgeSettings,
                     message: list[dict], responses: list[str]) -> dict:
    """All the judge says about one pair: its own answer, every vote, and the aggregate."""
    reference = await client.chat(
        prompts.self_reference_messages(message),
        max_tokens=settings.reference_max_tokens, temperature=settings.temperature,
        seed=request_seed(message, settings.seed, 0),
    )
    own_answer = reference["message"]["content"]
    if not own_answer.strip():
        own_answer = "(no answer)"
    # one vote after the other: the server then sees the same request alone whichever order the
    # pair came in (with --concurrency 1 labels are reproducible), and pairs in flight keep it busy
    results = [await _vote(client, prompts, settings, message, own_answer, responses, k)
               for k in range(settings.num_votes)]
    votes = [v for v, _ in results]
    preference = aggregate_votes(votes, settings.min_agreement)
    return {"own_answer": own_answer, "votes": [r for _, r in results], "preference": preference}


def preference_row(item_id: str, message: list[dict], responses: list[str], judged: dict, model: str) -> dict:
    """The output row: the schema ``train_rm_llama2.py`` reads (message / chose / reject / margin)
    plus the evidence behind it."""
    pref = judged["preference"]
    row = {"id": item_id, "message": message}
    if pref.chosen is not None:
        row |= {"chose": responses[pref.chosen], "reject": responses[1 - pref.chosen], "margin": round(pref.margin, 6)}
    row |= {
        "strength": pref.strength, "prob_first": pref.prob_first, "agreement": pref.agreement,
        "votes_counted": pref.votes_counted, "votes": judged["votes"],
        "judge_answer": judged["own_answer"], "judge_model": model,
    }
    if pref.reject_reason:
        row["reject_reason"] = pref.reject_reason
        row["responses"] = responses
    return row
