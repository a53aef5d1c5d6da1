"""Actor log-probs, reward and critic values from a packed row against plain per-sample HF."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from models.actor import Actor
from models.fsdp import save_hf_pretrained
from models.packing import PackedBatch
from models.value_model import Critic, RewardModel, load_value_model
from tests.conftest import random_sequences

TOL = 1e-5
LENGTHS = [12, 1, 30, 7, 7]


@pytest.fixture(scope="module")
def seqs(tiny_model_dir):
    vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    return random_sequences(LENGTHS, vocab, seed=7)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_actor_log_probs_and_entropy_match_full_logits(tiny_model_dir, seqs, temperature):
    actor = Actor.from_pretrained(tiny_model_dir)
    actor.chunk_size = 16  # several lm_head chunks
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pb = PackedBatch.from_sequences(seqs)
    # score only the second half of each sample (the "response")
    mask = torch.cat([torch.arange(len(s)) >= len(s) // 2 for s in seqs]).unsqueeze(0)
    out = actor(pb, token_mask=mask, temperature=temperature, return_entropy=True)

    for s, m, lp, ent in zip(seqs, pb.split(mask), pb.split(out.log_probs), pb.split(out.entropy)):
        logp = F.log_softmax(plain(input_ids=s.unsqueeze(0)).logits[0] / temperature, -1)
        expected = torch.zeros(len(s))
        expected_ent = torch.zeros(len(s))
        for t in range(1, len(s)):
            if m[t]:
                expected[t] = logp[t - 1, s[t]]
                expected_ent[t] = -(logp[t - 1].exp() * logp[t - 1]).sum()
        assert (lp - expected).abs().max() <= TOL
        assert (ent - expected_ent).abs().max() <= TOL
        assert lp[0] == 0  # the first token of a sample is never scored
    assert out.log_probs[0, mask[0]].abs().sum() > 0


def test_reward_model_saved_folder_scores_identically_in_plain_transformers(tiny_model_dir, seqs, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(tiny_model_dir)  # from a causal LM: fresh score head
    assert rm.model.score.weight.abs().max() > 0
    pb = PackedBatch.from_sequences(seqs)
    with torch.no_grad():
        rewards = rm(pb)
    save_hf_pretrained(rm.model, tmp_path / "rm")

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert plain.config.num_labels == 1
    for s, r in zip(seqs, rewards):
        with torch.no_grad():
            assert abs(plain(s.unsqueeze(0)).logits[0, 0].item() - r.item()) <= TOL
    # reloading through our class keeps the trained head (no re-initialisation)
    again = RewardModel.from_pretrained(str(tmp_path / "rm"))
    with torch.no_grad():
        assert torch.allclose(again(pb), rewards, atol=TOL, rtol=0)
    assert rewards.std() > 0


def test_critic_values_match_per_sample(tiny_model_dir, seqs):
    torch.manual_seed(0)
    critic = Critic(load_value_model(tiny_model_dir))
    pb = PackedBatch.from_sequences(seqs)
    with torch.no_grad():
        values = critic(pb)
        assert values.shape == (1, sum(LENGTHS))
        for s, v in zip(seqs, pb.split(values)):
            assert (critic(PackedBatch.from_sequences([s]))[0] - v).abs().max() <= TOL
        # the reward is the critic's value at the last token (same backbone and head)
        rm = RewardModel(critic.model)
        assert torch.allclose(rm(pb), pb.gather_last(values.unsqueeze(-1)).squeeze(-1), atol=TOL)


def test_value_heads_never_compute_vocabulary_logits(tiny_model_dir, seqs):
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(tiny_model_dir)
    assert not hasattr(rm.model, "lm_head")  # sequence-classification model: no LM head at all
    actor = Actor.from_pretrained(tiny_model_dir)
    shapes = []
    actor.model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    pb = PackedBatch.from_sequences(seqs)
    mask = torch.zeros_like(pb.input_ids, dtype=torch.bool)
    mask[0, -3:] = True
    actor(pb, token_mask=mask)
    assert shapes == [(3, actor.model.config.vocab_size)]  # logits only where scored


def test_padded_batches_match_packed_for_every_head(tiny_model_dir, seqs):
    """PaddedBatch is the reference layout: rewards, values and log-probs agree with packing, and
    the reward model's LM head scores exactly like the causal LM it came from."""
    from models.packing import PaddedBatch

    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(tiny_model_dir, with_lm_head=True)
    actor = Actor.from_pretrained(tiny_model_dir)
    pad_id = rm.model.config.pad_token_id
    packed = PackedBatch.from_sequences(seqs)
    padded = PaddedBatch.from_sequences(seqs, pad_id)
    halves = [torch.arange(len(s)) >= len(s) // 2 for s in seqs]
    packed_mask = torch.cat(halves).unsqueeze(0)
    padded_mask = PaddedBatch.from_sequences([h.long() for h in halves], 0).input_ids.bool()

    with torch.no_grad():
        r_packed, lp_packed = rm(packed, packed_mask)
        r_padded, lp_padded = rm(padded, padded_mask)
        assert torch.allclose(r_packed, r_padded, atol=TOL, rtol=0)
        for i, part in enumerate(packed.split(lp_packed)):
            assert (part - lp_padded[i, : len(part)]).abs().max() <= TOL
            assert lp_padded[i, len(part):].abs().sum() == 0  # padding is never scored
        actor_lp = actor(packed, packed_mask).log_probs
        assert (actor_lp - lp_packed).abs().max() <= TOL
        critic = Critic(rm.model)
        v_packed, v_padded = critic(packed), critic(padded)
        for i, part in enumerate(packed.split(v_packed)):
            assert (part - v_padded[i, : len(part)]).abs().max() <= TOL
