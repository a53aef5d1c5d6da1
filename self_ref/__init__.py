"""Self-reference AI feedback (Bao et al., arXiv 2406.11190): an LLM judge answers the question
itself, then compares two candidate responses against its own answer under one general principle,
in both orders; its verdict-token probabilities give the preference strength.

prompts.py   the editable prompt templates (configs/self_ref_prompts.yaml)
verdict.py   reading "A" / "B" out of a judgement
votes.py     votes from both orders -> preferred response, agreement, strength, margin
client.py    OpenAI-compatible judge client: several servers, retries, capability detection
judge.py     the method for one pair: own answer -> judgements -> votes
label.py     python -m self_ref.label: resumable, lossless labelling of a pairs file
generate.py  python -m self_ref.generate: two sampled responses per prompt from a policy
"""
