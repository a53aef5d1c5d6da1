"""A reward model's score for finished conversations, offline: each (prompt messages, response)
tokenized exactly as the RM is trained (``rlhf_data.tokenize.tokenize_prompt_response``: the
response ends with one end-of-turn token, where the score is read) and scored in packed forwards.
Used by the judged comparison (``self_ref.compare_policies``) and the truth-set check of a reward
model (``self_ref.evaluate --reward_model``)."""

from __future__ import annotations

import gc
from typing import Sequence

from training.progress import progress_bar


def score_conversations(reward_model: str, conversations: Sequence[tuple[list[dict], str]], max_len: int = 2048,
                        batch_tokens: int = 8192, sources: Sequence[tuple[str, int]] | None = None,
                        desc: str = "reward") -> list[float]:
    """One reward per ``(message, response)``, in order. ``sources`` gives each its (file, row)
    for data errors; ``batch_tokens`` bounds a packed forward (a longer conversation gets its own)."""
    import torch
    from transformers import AutoTokenizer

    from models.packing import PackedBatch, pack_sequences
    from models.value_model import RewardModel
    from rlhf_data.tokenize import tokenize_prompt_response

    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    seqs = []
    for i, (message, response) in enumerate(conversations):
        source, row = sources[i] if sources else ("conversations", i)
        seqs.append(tokenize_prompt_response(tokenizer, message, response, max_len, source=source, row=row).input_ids)
    if not seqs:
        return []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rm = RewardModel.from_pretrained(reward_model).to(device).eval()
    bins = pack_sequences([len(s) for s in seqs], max(batch_tokens, max(len(s) for s in seqs)))
    rewards: list[float] = [0.0] * len(seqs)
    bar = progress_bar(len(seqs), desc, unit="response")
    with torch.no_grad():
        for b in bins:
            for i, r in zip(b, rm(PackedBatch.from_sequences([seqs[i] for i in b]).to(device)).float().cpu().tolist()):
                rewards[i] = r
            bar.update(len(b))
    bar.close()
    del rm
    gc.collect()
    return rewards
