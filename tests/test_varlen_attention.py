"""Packed forward/backward must equal per-sample (unpadded) forward/backward exactly (fp32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from models.packing import PackedBatch
from models.varlen_attention import select_attn_implementation
from tests.conftest import random_lengths, random_sequences

TOL = 1e-5


def make_model(attn: str, kv_heads: int = 2, seed: int = 0):
    cfg = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=kv_heads, max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)


def packed_vs_per_sample(model, lengths, seed=0):
    """Max abs diff of logits and of parameter gradients, packed row vs one forward per sample."""
    seqs = random_sequences(lengths, 300, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # a loss touching every logit, scaled like a mean so gradients are O(1) as in training
    scale = (sum(lengths) * 300) ** -0.5
    weights = [torch.randn(n, 300, generator=g) * scale for n in lengths]

    model.zero_grad()
    ref_logits = []
    for s, w in zip(seqs, weights):
        out = model(input_ids=s.unsqueeze(0), use_cache=False).logits[0]
        (out * w).sum().backward()
        ref_logits.append(out.detach())
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    pb = PackedBatch.from_sequences(seqs)
    out = model(input_ids=pb.input_ids, **pb.attention_kwargs()).logits
    (out[0] * torch.cat(weights)).sum().backward()
    logit_diff = max((a - b).abs().max().item() for a, b in zip(pb.split(out.detach()), ref_logits))
    grad_diff = max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters())
    return logit_diff, grad_diff


PATTERNS = {
    "random_lengths": random_lengths(7, 2, 60, seed=5),
    "all_equal_lengths": [16] * 6,  # the seed system's bug: became plain causal attention
    "single_token_sample": [20, 1, 33, 1],
    "one_sample_fills_row": [128],
}


@pytest.mark.parametrize("attn", ["varlen_sdpa", "masked_sdpa"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_packed_equals_per_sample(attn, pattern):
    model = make_model(attn)
    logit_diff, grad_diff = packed_vs_per_sample(model, PATTERNS[pattern])
    assert logit_diff <= TOL, logit_diff
    assert grad_diff <= TOL, grad_diff


def test_packed_equals_per_sample_with_grouped_query_attention():
    model = make_model("varlen_sdpa", kv_heads=1)
    logit_diff, grad_diff = packed_vs_per_sample(model, [9, 30, 1, 17])
    assert logit_diff <= TOL and grad_diff <= TOL


def test_attention_mask_and_cache_cannot_break_packing():
    """The trap in plain transformers: an all-ones mask (or a cache) makes samples attend to each
    other. Our implementation takes the boundaries from cu_seq_lens and ignores both."""
    lengths = [16] * 4
    seqs = random_sequences(lengths, 300, seed=2)
    pb = PackedBatch.from_sequences(seqs)
    ones = torch.ones_like(pb.input_ids)

    plain = make_model("sdpa")
    leaky = plain(input_ids=pb.input_ids, position_ids=pb.position_ids, attention_mask=ones, use_cache=False).logits
    ref = torch.cat([plain(input_ids=s.unsqueeze(0), use_cache=False).logits[0] for s in seqs])
    assert (leaky[0] - ref).abs().max() > 1e-2, "negative control: sdpa with a mask must leak"

    ours = make_model("varlen_sdpa")
    kwargs = pb.attention_kwargs() | {"attention_mask": ones, "use_cache": True}
    out = ours(input_ids=pb.input_ids, **kwargs).logits
    assert (out[0] - ref).abs().max() <= TOL


def test_padded_batches_still_use_regular_sdpa():
    """Without cu_seq_lens the implementation is transformers' SDPA (padded batches, generate)."""
    ours, plain = make_model("varlen_sdpa"), make_model("sdpa")
    ids = torch.randint(3, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    a = ours(input_ids=ids, attention_mask=mask).logits
    b = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    gen_a = ours.generate(ids[1:2], max_new_tokens=5, do_sample=False)
    gen_b = plain.generate(ids[1:2], max_new_tokens=5, do_sample=False)
    assert torch.equal(gen_a, gen_b)


def test_select_attn_implementation_on_cpu():
    assert select_attn_implementation(None, "cpu") == "varlen_sdpa"
    assert select_attn_implementation(True, "cpu") == "varlen_sdpa"  # warns: no flash-attn on CPU
    assert select_attn_implementation(False, "cuda") == "varlen_sdpa"
