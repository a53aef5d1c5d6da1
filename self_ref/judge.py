"""The self-reference judgement of one pair (arXiv 2406.11190, section 3):

1. the judge answers the user's last question itself (its *reference* answer; at most
   ``reference_max_tokens``, or only its first paragraph with ``reference_first_paragraph``);
   ``mode="direct"`` (the paper's baseline) skips this step;
2. it compares responses A and B under one general principle, using its own answer as the
   reference, optionally writing a critique first (``max_tokens``; 0: no critique, the verdict
   is read right after the judgement request), and ends with a verdict; this is asked
   ``num_votes`` times, alternating the order (A/B = 1/2, then 2/1) so that position bias
   cancels. Votes after the first round (one vote per order) are sampled at
   ``vote_temperature`` (self-consistency), and with ``resample_reference`` each such round also
   gets a freshly sampled own answer (the seed system regenerated it every round);
3. each vote's strength is the judge's probability of label A versus B at the verdict,

       p(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B)) = sigmoid(lp_A - lp_B)

   from its token log-probabilities, in this order of preference:
   ``score``: both labels scored as the continuation of the judge's reply so far (its critique,
   or nothing, then the verdict prefix; vLLM's ``continue_final_message`` + ``logprob_token_ids``
   or ``prompt_logprobs``; exact, even when the text has no verdict);
   ``top_logprobs``: the labels' entries among the top log-probs of the generated verdict token
   (servers without the extensions, e.g. lmdeploy);
   ``text``: the parsed verdict only (probability 1 or 0). ``score_verdict=False`` forces it.

Verdict formats (``verdict``): ``pair`` is the paper's (both responses in one request, label A or
B). ``pointwise`` asks, for each response alone, whether it is right judged against the own
answer (yes/no labels, same scoring), and a vote's p(A) = sigmoid(logit p_yes(A) - logit
p_yes(B)); the two orders of a round share the checks, so it costs one request per response and
has no position bias. A 135M judge's A/B labels are at chance; its yes/no checks are not
(``benchmarks/judge_variants.py``).

Unparsable text is re-asked (``max_parse_retries``, at ``retry_temperature``), then the vote is
counted as unusable and its raw text kept. ``self_ref.votes`` turns the votes into the label,
after an optional per-pair position-bias correction (``debias="pair"``) and with the vote
aggregate ``aggregate`` ("mean_prob" or "log_odds").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field

from self_ref.client import OpenAIClient
from self_ref.prompts import JudgePrompts
from self_ref.verdict import parse_verdict, verdict_prefix_end
from self_ref.votes import AGGREGATES, Vote, aggregate_votes, debias_votes, logit, sigmoid
from training.config import ConfigError, check_fields

MODES = ("self_reference", "direct")
DEBIAS = ("none", "pair")
VERDICTS = ("pair", "pointwise")
# the judge settings that take one of a few values (checked in JudgeSettings and JudgeFlags alike)
CHOICES = {"mode": MODES, "debias": DEBIAS, "aggregate": AGGREGATES, "verdict": VERDICTS}
CHOICE_TITLES = {"mode": "judge mode", "debias": "debias", "aggregate": "aggregate", "verdict": "verdict format"}


def bad_choice(obj, choices: dict[str, tuple[str, ...]]) -> tuple[str, str, tuple[str, ...]] | None:
    """The first ``(name, value, allowed)`` of ``choices`` whose value on ``obj`` is not allowed."""
    for name, allowed in choices.items():
        value = getattr(obj, name)
        if value not in allowed:
            return name, value, allowed
    return None


@dataclass(frozen=True)
class JudgeSettings:
    mode: str = "self_reference"  # "direct": no own answer (the paper's baseline)
    num_votes: int = 2
    min_agreement: float = 0.5
    temperature: float = 0.0  # the first round (one vote per order) and the own answer
    vote_temperature: float = 0.7  # later rounds: sampled, so that extra votes differ
    retry_temperature: float = 0.7
    max_tokens: int = 512  # critique tokens before the verdict; 0: no critique
    reference_max_tokens: int = 512
    max_parse_retries: int = 2
    top_logprobs: int = 20
    score_verdict: bool = True  # False: the text's verdict only (probability 1 or 0)
    verdict: str = "pair"  # "pointwise": each response checked alone against the own answer (yes/no)
    debias: str = "none"  # "pair": remove the pair's position bias from the votes' log-odds
    aggregate: str = "mean_prob"  # or "log_odds"
    resample_reference: bool = False  # rounds after the first use a newly sampled own answer
    reference_first_paragraph: bool = False  # the own answer stops at its first blank line
    seed: int = 0

    def __post_init__(self):
        bad = bad_choice(self, CHOICES)
        if bad:
            name, value, allowed = bad
            raise ValueError(f"unknown {CHOICE_TITLES[name]} {value!r}; expected one of {', '.join(allowed)}")
        if self.num_votes < 1 or self.max_tokens < 0 or self.reference_max_tokens < 1:
            raise ValueError("num_votes and reference_max_tokens must be >= 1, max_tokens >= 0")


@dataclass
class JudgeFlags:
    """The judge's method: the same flags (names and defaults) in ``self_ref.label``."""

    prompts: str | None = field(default=None, metadata={"help": "prompt templates YAML (default configs/self_ref_prompts.yaml, the paper's layout; a ~100M judge: --config configs/judge_small.yaml, which names configs/judge_small_prompts.yaml)"})
    num_votes: int = field(default=2, metadata={"help": "judgements per pair, orders alternating (even: balanced)", "check": ">= 1"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature of the own answer and the first round of votes", "check": ">= 0"})
    vote_temperature: float = field(default=0.7, metadata={"help": "temperature of votes after the first round (self-consistency)", "check": ">= 0"})
    max_tokens: int = field(default=512, metadata={"help": "max critique tokens before the verdict; 0: no critique, the verdict labels are scored right after the request", "check": ">= 0"})
    reference_max_tokens: int = field(default=512, metadata={"help": "max tokens of the judge's own answer", "check": ">= 1"})
    max_parse_retries: int = field(default=2, metadata={"help": "re-asks of a critique without a verdict line", "check": ">= 0"})
    score_verdict: bool = field(default=True, metadata={"help": "strength from the labels' log-probs (--no-score_verdict: the text's verdict only)"})
    verdict: str = field(default="pair", metadata={"help": "verdict format: pair (both responses, label A/B: the paper's) | pointwise (each response checked against the own answer, yes/no)"})
    debias: str = field(default="none", metadata={"help": "position-bias correction: none | pair (remove the pair's mean log-odds of label A)"})
    aggregate: str = field(default="mean_prob", metadata={"help": "vote aggregate: mean_prob | log_odds"})
    resample_reference: bool = field(default=False, metadata={"help": "vote rounds after the first use a newly sampled own answer"})
    reference_first_paragraph: bool = field(default=False, metadata={"help": "the own answer stops at its first blank line (a small judge states its answer there; saves most of its tokens)"})
    seed: int = 0

    def check_judge_flags(self) -> None:
        """Every field's rule (those of the command's own config too), then the choices."""
        check_fields(self)
        bad = bad_choice(self, {k: v for k, v in CHOICES.items() if k != "mode"})  # --mode: each command's own
        if bad:
            name, value, allowed = bad
            raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")

    def judge_settings(self, mode: str = "self_reference", min_agreement: float = 0.5) -> JudgeSettings:
        return JudgeSettings(
            mode=mode, num_votes=self.num_votes, min_agreement=min_agreement, temperature=self.temperature,
            vote_temperature=self.vote_temperature, max_tokens=self.max_tokens,
            reference_max_tokens=self.reference_max_tokens, max_parse_retries=self.max_parse_retries,
            score_verdict=self.score_verdict, verdict=self.verdict, debias=self.debias, aggregate=self.aggregate,
            resample_reference=self.resample_reference, reference_first_paragraph=self.reference_first_paragraph,
            seed=self.seed,
        )

    def load_prompts(self) -> JudgePrompts:
        try:
            return JudgePrompts.load(self.prompts)
        except ValueError as e:
            raise ConfigError(str(e)) from None



def request_seed(messages: list[dict], seed: int, attempt: int, round_: int = 0) -> int:
    """A sampling seed fixed by the request's content: the same judgement request gets the same
    answer whichever pair, order or run it comes from (re-asks after unparsable text sample;
    later rounds of self-consistency sample anew)."""
    key = [seed, attempt, messages] if round_ == 0 else [seed, attempt, round_, messages]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def p_a_from_top_logprobs(choice: dict, prompts: JudgePrompts, from_start: bool = False,
                          labels: tuple[str, str] | None = None) -> float | None:
    """P(A) / (P(A) + P(B)) from the top log-probs of the token generated right after the verdict
    prefix (``from_start``: the reply was asked to begin with the label, so without a prefix the
    first token whose top list holds a label is read); a label missing from the top-k gets the
    smallest listed log-prob (an upper bound)."""
    content = (choice.get("logprobs") or {}).get("content") or []

    def read(entry: dict) -> float | None:
        top = {t["token"].strip(): t["logprob"] for t in entry.get("top_logprobs") or []}
        la, lb = (top.get(label) for label in (labels or prompts.labels))
        if la is None and lb is None:
            return None
        floor = min(top.values())
        return sigmoid((la if la is not None else floor) - (lb if lb is not None else floor))

    text = ""
    for entry in content:
        if prompts.verdict_prefix in text and text.rstrip().endswith(prompts.verdict_prefix.rstrip()):
            return read(entry)
        text += entry.get("token", "")
    if from_start and prompts.verdict_prefix not in text:
        for entry in content[:4]:
            found = read(entry)
            if found is not None:
                return found
    return None


async def _ask(client: OpenAIClient, prompts: JudgePrompts, settings: JudgeSettings, messages: list[dict],
               labels: tuple[str, str], start_prefix: str, round_: int) -> dict:
    """One judgement request and its verdict: ``p0``, the judge's probability of ``labels[0]``
    against ``labels[1]`` (None without log-probs), ``verdict`` (the label index the text or the
    scores name), ``source`` and ``text``. Without a critique the labels are scored right after
    ``start_prefix`` (the reply's start); after a critique, after the verdict prefix."""
    no_critique = settings.max_tokens == 0
    if no_critique and settings.score_verdict and (client.supports_token_scoring is not False
                                                   or client.supports_scoring is not False):
        # no critique: the labels' log-probs right at the start of the reply, one request
        sep = " " if start_prefix and not start_prefix.endswith((" ", "\n")) else ""
        scores = await client.score_continuations(messages, start_prefix, [sep + label for label in labels],
                                                  tail_chars=max(len(start_prefix), 1))
        if scores is not None:
            verdict = 0 if scores[0] > scores[1] else 1 if scores[1] > scores[0] else None
            text = start_prefix + ("" if verdict is None else sep + labels[verdict])
            return {"p0": sigmoid(scores[0] - scores[1]), "verdict": verdict, "source": "score", "text": text}

    # a critique (or, on a server that cannot score, a few tokens to read the verdict from)
    want_top = settings.score_verdict and (client.supports_scoring is False or no_critique)
    base_temperature = settings.temperature if round_ == 0 else max(settings.temperature, settings.vote_temperature)
    attempts, verdict, choice, text, params = [], None, None, "", {}
    for attempt in range(settings.max_parse_retries + 1):
        params = {"max_tokens": settings.max_tokens if not no_critique else 8,
                  "seed": request_seed(messages, settings.seed, attempt, round_),
                  "temperature": base_temperature if attempt == 0 else settings.retry_temperature}
        if want_top:
            params |= {"logprobs": True, "top_logprobs": settings.top_logprobs}
        choice = await client.chat(messages, **params)
        text = choice["message"]["content"]
        attempts.append(text)
        verdict = parse_verdict(text, prompts, labels)
        if verdict is None and no_critique:  # asked to start with the label: "B" alone is one
            verdict = parse_verdict(f"{prompts.verdict_prefix} {text.strip()}", prompts, labels)
        if verdict is not None or no_critique:
            break

    p0, source = None, "text"
    if settings.score_verdict:
        scores = None
        if not no_critique:
            cut = verdict_prefix_end(text, prompts)
            prefix = text[:cut] if cut is not None else text.rstrip() + "\n" + prompts.verdict_prefix
            # the prefix ends with the verdict prefix, which alone decides how the labels tokenize after it
            scores = await client.score_continuations(messages, prefix, [" " + label for label in labels],
                                                      tail_chars=len(prompts.verdict_prefix))
        if scores is not None:
            p0, source = sigmoid(scores[0] - scores[1]), "score"
        else:
            if not want_top:  # learned just now that the server cannot score: ask with top log-probs
                choice = await client.chat(messages, **params, logprobs=True, top_logprobs=settings.top_logprobs)
            top = p_a_from_top_logprobs(choice, prompts, from_start=no_critique, labels=labels)
            if top is not None:
                p0, source = top, "top_logprobs"
    found = {"p0": p0, "verdict": verdict, "source": source, "text": text}
    if len(attempts) > 1:
        found["unparsable_attempts"] = attempts[:-1] if verdict is not None else attempts
    return found


async def _vote(client: OpenAIClient, prompts: JudgePrompts, settings: JudgeSettings,
                message: list[dict], own_answer: str | None, responses: list[str], k: int,
                checks: dict | None = None) -> tuple[Vote, dict]:
    """Vote ``k``: order A/B for even k, B/A for odd k, round k // 2. Pair format: one request
    with both responses. Pointwise: each response's check (cached in ``checks`` per response and
    round, so the two orders of a round share them) and

        p(A) = sigmoid(logit p_yes(A) - logit p_yes(B))     (log-odds clipped, see votes.logit)
    """
    swapped = k % 2 == 1
    round_ = k // 2
    shown = (1, 0) if swapped else (0, 1)
    record = {"order": "BA" if swapped else "AB"}
    checks = {} if checks is None else checks
    if settings.max_tokens == 0 and settings.score_verdict and not (settings.resample_reference and own_answer is not None):
        round_ = 0  # scored labels of the same request: a later round would only repeat the first
    if settings.verdict == "pair":
        if ("pair", swapped, round_) not in checks:
            messages = prompts.judgement_messages(message, own_answer, responses[shown[0]], responses[shown[1]])
            checks[("pair", swapped, round_)] = await _ask(client, prompts, settings, messages, prompts.labels,
                                                           prompts.verdict_prefix, round_)
        found = dict(checks[("pair", swapped, round_)])
        p_a, verdict = found.pop("p0"), found.pop("verdict")
        label = None if verdict is None else prompts.labels[verdict]
    else:
        for i in shown:
            if (i, round_) not in checks:
                messages = prompts.pointwise_messages(message, own_answer, responses[i])
                checks[(i, round_)] = asyncio.ensure_future(_ask(
                    client, prompts, settings, messages, prompts.pointwise_labels, prompts.pointwise_prefix, round_))
        first, second = [await checks[(i, round_)] for i in shown]
        p_yes = [c["p0"] if c["p0"] is not None else None if c["verdict"] is None else float(c["verdict"] == 0)
                 for c in (first, second)]
        p_a = None if None in p_yes else sigmoid(logit(p_yes[0]) - logit(p_yes[1]))
        verdict = None if p_a is None or p_a == 0.5 else (0 if p_a > 0.5 else 1)
        label = None if verdict is None else prompts.labels[verdict]
        record["pointwise"] = True
        sources = {first["source"], second["source"]}
        found = {"source": sources.pop() if len(sources) == 1 else "+".join(sorted(sources)),
                 "checks": [{"shown": "AB"[j], "response": i + 1, "p_yes": py, "text": c["text"]}
                            for j, (i, py, c) in enumerate(zip(shown, p_yes, (first, second)))]}
    vote = Vote(swapped, verdict, p_a)
    record |= {"verdict": label, "p_a": p_a, "p_first": vote.p_first, **found}
    return vote, record


async def own_answer_of(client: OpenAIClient, prompts: JudgePrompts, settings: JudgeSettings,
                        message: list[dict], round_: int = 0) -> str:
    """The judge's own answer to the conversation (round 0: at ``temperature``; later rounds of
    ``resample_reference``: sampled at ``vote_temperature``)."""
    temperature = settings.temperature if round_ == 0 else max(settings.temperature, settings.vote_temperature)
    # stop at a blank line: the paragraph break itself (and what follows) is left out
    stop = {"stop": ["\n\n"]} if settings.reference_first_paragraph else {}
    reference = await client.chat(
        prompts.self_reference_messages(message),
        max_tokens=settings.reference_max_tokens, temperature=temperature,
        seed=request_seed(message, settings.seed, 0, round_), **stop,
    )
    answer = reference["message"]["content"]
    return answer if answer.strip() else "(no answer)"


async def judge_pair(client: OpenAIClient, prompts: JudgePrompts, settings: JudgeSettings,
                     message: list[dict], responses: list[str]) -> dict:
    """All the judge says about one pair: its own answer (None in direct mode), every vote, and
    the aggregate (a ``Preference``)."""
    own_answer = None
    answers: dict[int, str] = {}
    if settings.mode == "self_reference":
        own_answer = answers[0] = await own_answer_of(client, prompts, settings, message)
    # one vote after the other: the server then sees the same request alone whichever order the
    # pair came in (with --concurrency 1 labels are reproducible), and pairs in flight keep it busy
    results = []
    checks: dict = {}  # pointwise: each response's check per round, shared by the round's two orders
    for k in range(settings.num_votes):
        reference = own_answer
        if own_answer is not None and settings.resample_reference and k // 2 > 0:
            if k // 2 not in answers:
                answers[k // 2] = await own_answer_of(client, prompts, settings, message, k // 2)
            reference = answers[k // 2]
        results.append(await _vote(client, prompts, settings, message, reference, responses, k, checks))
    votes = [v for v, _ in results]
    records = [r for _, r in results]
    if settings.debias == "pair":
        corrected = debias_votes(votes)
        for record, old, new in zip(records, votes, corrected):
            if new is not old:
                record |= {"p_a_raw": old.p_a, "p_first_raw": old.p_first, "p_a": new.p_a, "p_first": new.p_first}
        votes = corrected
    preference = aggregate_votes(votes, settings.min_agreement, settings.aggregate)
    judged = {"own_answer": own_answer, "votes": records, "preference": preference}
    if len(answers) > 1:
        judged["own_answers"] = [answers[r] for r in sorted(answers)]
    return judged


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
    if "own_answers" in judged:
        row["judge_answers"] = judged["own_answers"]
    if pref.reject_reason:
        row["reject_reason"] = pref.reject_reason
        row["responses"] = responses
    return row
