"""Verdict parsing, vote aggregation and the margin formula on hand-made cases."""

import math

import pytest

from self_ref.judge import JudgeSettings, p_a_from_top_logprobs, request_seed
from self_ref.prompts import JudgePrompts
from self_ref.verdict import parse_verdict, verdict_prefix_end
from self_ref.votes import MAX_MARGIN, Vote, aggregate_votes, debias_votes, logit, margin_from_strength, sigmoid

P = JudgePrompts.load()


@pytest.mark.parametrize("text,expected", [
    ("A is vague. B cites the source.\nVerdict: B", 1),
    ("Verdict: A", 0),
    ("**Verdict:** A", 0),
    ("verdict: [B]", 1),
    ("Verdict : Response A", 0),
    ("Verdict: a", 0),
    ('I will answer "Verdict: A" or "Verdict: B".\nAfter thinking: Verdict: B', 1),  # the last one counts
    ("Response A is a good answer. B also.", None),  # no verdict line
    ("Verdict: C", None),
    ("Verdict: Absolutely", None),  # "A" must be a whole label
    ("", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text, P) == expected


def test_custom_labels_and_prefix():
    prompts = JudgePrompts(principle="p", judgement="{principle} {response_a} {response_b} {verdict_prefix}",
                           verdict_prefix="Final answer:", labels=("1", "2"))
    assert parse_verdict("blah\nFinal answer: 2", prompts) == 1
    assert parse_verdict("Verdict: A", prompts) is None
    assert verdict_prefix_end("xx Final answer: 2", prompts) == len("xx Final answer:")


def test_prompt_templates_render_and_fail_clearly(tmp_path):
    msgs = P.judgement_messages([{"role": "user", "content": "Q?"}], "my answer", "resp one", "resp two")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "my answer"
    assert "resp one" in msgs[2]["content"] and "resp two" in msgs[2]["content"]
    assert msgs[2]["content"].index("resp one") < msgs[2]["content"].index("resp two")
    assert "Verdict: A" in msgs[2]["content"] and "humanity" in msgs[2]["content"]
    bad = tmp_path / "p.yaml"
    bad.write_text("principle: x\njudgement: '{response_a} {respons_b}'\n")
    with pytest.raises(ValueError, match="unknown placeholder"):
        JudgePrompts.load(bad)
    bad.write_text("principle: x\njudgement: y\nfoo: 1\n")
    with pytest.raises(ValueError, match="unknown template key"):
        JudgePrompts.load(bad)


def test_vote_maps_swapped_orders_back():
    assert Vote(swapped=False, verdict=0, p_a=None).p_first == 1.0
    assert Vote(swapped=True, verdict=0, p_a=None).p_first == 0.0  # A was response 2
    assert Vote(swapped=False, verdict=1, p_a=0.8).p_first == pytest.approx(0.8)  # log-probs win over text
    assert Vote(swapped=True, verdict=None, p_a=0.8).p_first == pytest.approx(0.2)
    assert Vote(swapped=True, verdict=None, p_a=None).p_first is None


def test_margin_is_the_log_odds_of_the_strength():
    assert margin_from_strength(0.5) == 0.0
    assert margin_from_strength(0.8) == pytest.approx(math.log(4))
    assert sigmoid(margin_from_strength(0.9)) == pytest.approx(0.9)
    assert margin_from_strength(1.0) == MAX_MARGIN
    assert margin_from_strength(1 - 1e-12) == MAX_MARGIN


def test_aggregate_consistent_votes():
    # both orders prefer response 1 with probabilities 0.9 and 0.7
    votes = [Vote(False, 0, 0.9), Vote(True, 1, 0.3)]
    pref = aggregate_votes(votes)
    assert pref.chosen == 0 and pref.agreement == 1.0 and pref.votes_counted == 2
    assert pref.prob_first == pytest.approx(0.8) and pref.strength == pytest.approx(0.8)
    assert pref.margin == pytest.approx(math.log(4))


def test_pure_position_bias_cancels_into_a_tie():
    # the judge always says "A" with p 0.9, whatever is shown: no information about the pair
    pref = aggregate_votes([Vote(False, 0, 0.9), Vote(True, 0, 0.9)])
    assert pref.prob_first == pytest.approx(0.5)
    assert pref.chosen is None and pref.reject_reason == "tie"


def test_disagreement_below_threshold_is_rejected_with_reason():
    votes = [Vote(False, 0, None), Vote(True, 1, None), Vote(False, 0, None), Vote(True, 0, None)]
    pref = aggregate_votes(votes, min_agreement=0.75)  # 3 of 4 prefer response 1: agreement 0.75
    assert pref.chosen == 0 and pref.agreement == 0.75 and pref.strength == 0.75
    pref = aggregate_votes(votes, min_agreement=0.8)
    assert pref.chosen is None and "below min_agreement" in pref.reject_reason


def test_unusable_votes_are_not_counted():
    pref = aggregate_votes([Vote(False, None, None), Vote(True, 1, None)])
    assert pref.votes_counted == 1 and pref.chosen == 0 and pref.agreement == 1.0
    assert aggregate_votes([Vote(False, None, None)]).reject_reason == "no usable vote"


def test_swapping_the_input_pair_flips_the_probability():
    votes = [Vote(False, 0, 0.7), Vote(True, 0, 0.6)]
    swapped_input = [Vote(False, 0, 0.6), Vote(True, 0, 0.7)]  # same judgements, roles exchanged
    assert aggregate_votes(votes).prob_first == pytest.approx(1 - aggregate_votes(swapped_input).prob_first)


def test_strength_from_top_logprobs():
    def tok(t, lp, top=()):
        return {"token": t, "logprob": lp, "top_logprobs": [{"token": a, "logprob": b} for a, b in top]}

    choice = {"logprobs": {"content": [
        tok("Fine", -1), tok(". Verdict", -1), tok(":", -0.1),
        tok(" B", -0.4, [(" B", -0.4), (" A", -1.4), (" The", -3.0)]),
    ]}}
    assert p_a_from_top_logprobs(choice, P) == pytest.approx(sigmoid(-1.0))
    only_b = {"logprobs": {"content": [tok("Verdict:", -1), tok(" B", -0.1, [(" B", -0.1), (" x", -5.0)])]}}
    assert p_a_from_top_logprobs(only_b, P) == pytest.approx(sigmoid(-4.9))  # A bounded by the floor
    assert p_a_from_top_logprobs({"logprobs": None}, P) is None


# --- the judge's levers: formats, layouts, position-bias correction, aggregates -----------------

SMALL = JudgePrompts.load("configs/judge_small_prompts.yaml")


def test_layouts_of_the_judgement_request():
    conv = [{"role": "user", "content": "Q?"}]
    # the paper's layout: own answer as an assistant turn, the request after it
    turn = P.judgement_messages(conv, "mine", "one", "two")
    assert [m["role"] for m in turn] == ["user", "assistant", "user"] and turn[1]["content"] == "mine"
    # the small judge's: one user turn quoting the question and the reference next to the responses
    inline = SMALL.judgement_messages(conv, "mine", "one", "two")
    assert [m["role"] for m in inline] == ["user"]
    text = inline[0]["content"]
    assert text.index("Q?") < text.index("mine") < text.index("one") < text.index("two")
    # direct mode: no own answer anywhere
    for prompts in (P, SMALL):
        direct = prompts.judgement_messages(conv, None, "one", "two")
        assert [m["role"] for m in direct] == ["user"] and "mine" not in direct[0]["content"]
        assert "Q?" in direct[0]["content"]
    # pointwise: one response per request, with and without the reference
    check = SMALL.pointwise_messages(conv, "mine", "one")
    assert "mine" in check[0]["content"] and "one" in check[0]["content"] and "Yes or No" in check[0]["content"]
    assert "mine" not in SMALL.pointwise_messages(conv, None, "one")[0]["content"]
    paper_check = P.pointwise_messages(conv, "mine", "one")
    assert [m["role"] for m in paper_check] == ["user", "assistant", "user"]


def test_prompt_files_refuse_layouts_that_lose_the_reference(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("principle: x\njudgement: '{response_a} {response_b}'\nreference_turn: false\n")
    with pytest.raises(ValueError, match="must quote"):
        JudgePrompts.load(bad)
    bad.write_text("principle: x\njudgement: '{response_a} {response_b}'\ndirect_pointwise: '{reference} {response}'\n")
    with pytest.raises(ValueError, match="direct mode has no own answer"):
        JudgePrompts.load(bad)
    bad.write_text("principle: x\njudgement: '{response_a} {response_b}'\npointwise_labels: [Yes, Yes]\n")
    with pytest.raises(ValueError, match="pointwise_labels must be two different"):
        JudgePrompts.load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        JudgePrompts.load(tmp_path / "none.yaml")


def test_parse_verdict_with_other_labels():
    assert parse_verdict("It matches.\nVerdict: No", P, ("Yes", "No")) == 1
    assert parse_verdict("Verdict: yes", P, ("Yes", "No")) == 0
    assert parse_verdict("Verdict: A", P, ("Yes", "No")) is None


def test_top_logprobs_read_from_the_reply_start():
    choice = {"logprobs": {"content": [{"token": "Yes", "logprob": -0.2, "top_logprobs": [
        {"token": "Yes", "logprob": -0.2}, {"token": "No", "logprob": -1.7}]}]}}
    assert p_a_from_top_logprobs(choice, P, from_start=True, labels=("Yes", "No")) == pytest.approx(sigmoid(1.5))
    assert p_a_from_top_logprobs(choice, P, labels=("Yes", "No")) is None  # without from_start: needs the prefix


def test_debias_removes_the_pairs_position_bias():
    # the judge adds b = 1.5 to label A's log-odds in both orders; the contents say d = 0.5 for response 1
    b, d = 1.5, 0.5
    raw = [Vote(False, 0, sigmoid(b + d)), Vote(True, 0, sigmoid(b - d))]
    assert [v.p_first > 0.5 for v in raw] == [True, False]  # the raw orders disagree
    fixed = debias_votes(raw)
    assert [v.p_first for v in fixed] == pytest.approx([sigmoid(d), sigmoid(d)])
    pref = aggregate_votes(fixed)
    assert pref.chosen == 0 and pref.agreement == 1.0 and pref.strength == pytest.approx(sigmoid(d))
    # the decision of two votes is the same with or without it
    assert aggregate_votes(raw).chosen == 0
    # one order only: nothing to estimate the bias from
    assert debias_votes(raw[:1]) == raw[:1]


def test_log_odds_aggregate():
    votes = [Vote(False, 0, 0.9), Vote(True, 1, 0.4)]  # p_first 0.9 and 0.6
    mean_logit = (math.log(9) + math.log(1.5)) / 2
    assert aggregate_votes(votes, method="log_odds").prob_first == pytest.approx(sigmoid(mean_logit))
    assert aggregate_votes(votes).prob_first == pytest.approx(0.75)
    text_only = [Vote(False, 0, None), Vote(True, 1, None)]  # p_first 1 and 1: log-odds clipped
    assert aggregate_votes(text_only, method="log_odds").prob_first == pytest.approx(sigmoid(MAX_MARGIN))
    assert logit(0.0) == -MAX_MARGIN and logit(1.0) == MAX_MARGIN and logit(0.5) == 0.0
    with pytest.raises(ValueError, match="unknown aggregate"):
        aggregate_votes(votes, method="median")


def test_judge_settings_and_seeds():
    with pytest.raises(ValueError, match="unknown judge mode"):
        JudgeSettings(mode="reference")
    with pytest.raises(ValueError, match="unknown verdict format"):
        JudgeSettings(verdict="triple")
    with pytest.raises(ValueError, match="max_tokens >= 0"):
        JudgeSettings(max_tokens=-1)
    msgs = [{"role": "user", "content": "Q?"}]
    # round 0 keeps the seed of earlier releases' requests; later rounds sample anew
    assert request_seed(msgs, 0, 0) == request_seed(msgs, 0, 0, 0) != request_seed(msgs, 0, 0, 1)
