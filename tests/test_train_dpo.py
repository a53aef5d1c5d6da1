"""train_dpo.py and training.dpo_losses: the losses against hand-computed values, learning on the
tiny model with the saved policy checked against plain transformers, equal curves for packed /
padded rows, a precomputed / on-the-fly reference and 2 FSDP ranks / 1 process, and bad strengths
stopping before training with the file, row and field."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_dpo
from rlhf_data import PreferenceKeys
from rlhf_data.errors import DataError
from rlhf_data.tokenize import tokenize_preference
from tests.synthetic_data import preference_rows, write_jsonl, write_preference_split
from tests.trainer_runs import base_args, kill_after_checkpoint, losses, run_script
from training.dpo_losses import dpo_loss, ipo_loss, sigmoid_dpo_loss
from training.metrics_logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]

# --- the losses, by hand ------------------------------------------------------------------------


def test_sigmoid_ipo_and_strength_losses_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.0, -3.5])
    # h = (pc - rc) - (pr - rr): (1 - (-1), 0.5 - 0.5) = (2, 0)
    losses, chosen, rejected = dpo_loss("sigmoid", pc, pr, rc, rr, beta=0.5)
    assert torch.allclose(losses, torch.tensor([math.log1p(math.exp(-1.0)), math.log(2.0)]))
    assert torch.allclose(chosen, torch.tensor([0.5, 0.25])) and torch.allclose(rejected, torch.tensor([-0.5, 0.25]))
    # conservative DPO: eps of the label flipped
    smoothed = sigmoid_dpo_loss(torch.tensor([2.0]), 0.5, 0.2)
    assert math.isclose(smoothed.item(), 0.8 * math.log1p(math.exp(-1.0)) + 0.2 * math.log1p(math.exp(1.0)), rel_tol=1e-6)
    # IPO: (h - 1 / (2 beta))^2 = (2 - 1)^2, (0 - 1)^2
    assert torch.allclose(dpo_loss("ipo", pc, pr, rc, rr, beta=0.5)[0], torch.tensor([1.0, 1.0]))
    assert torch.allclose(ipo_loss(torch.tensor([3.0]), 0.25), torch.tensor([1.0]))
    # strength 1 is plain DPO; strength s is label smoothing 1 - s
    strength = torch.tensor([1.0, 0.8])
    got = dpo_loss("strength", pc, pr, rc, rr, beta=0.5, strength=strength)[0]
    assert torch.allclose(got[0], losses[0])
    assert math.isclose(got[1].item(), 0.8 * math.log(2.0) + 0.2 * math.log(2.0), rel_tol=1e-6)


def test_an_undecided_judgement_pulls_the_pair_together_not_apart():
    """At strength 0.5 the gradient pushes h towards 0 from either side; at strength 1 it always
    pushes h up (plain DPO)."""
    for h0, sign in ((1.0, -1.0), (-1.0, 1.0)):
        h = torch.tensor([h0], requires_grad=True)
        sigmoid_dpo_loss(h, 1.0, torch.tensor([0.5])).sum().backward()
        assert torch.sign(-h.grad).item() == sign  # gradient descent moves h towards 0
    h = torch.tensor([1.0], requires_grad=True)
    sigmoid_dpo_loss(h, 1.0, torch.tensor([0.0])).sum().backward()
    assert -h.grad.item() > 0
    with pytest.raises(ValueError, match="strengths must lie in"):
        dpo_loss("strength", *torch.zeros(4, 1), beta=0.1, strength=torch.tensor([0.3]))


# --- the trainer on the tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_preference_split(tmp_path_factory.mktemp("dpo_prefs"), 256,
                                  extra=lambda r: {"strength": 0.5 + 0.5 * r["margin"]})


def response_logprob(model, pair_ids: list[int], prompt_len: int) -> float:
    """Sum of log pi(token) over the response tokens, with plain transformers on one sequence."""
    ids = torch.tensor([pair_ids])
    with torch.no_grad():
        logits = model(ids).logits.float()
    lp = F.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[prompt_len - 1:].sum().item()


def test_learns_the_preference_and_the_saved_policy_scores_like_eval(tiny_model_dir, prefs, tmp_path):
    train, eval_ = prefs
    result = train_dpo.main(base_args(
        tiny_model_dir, train, tmp_path, eval_dataset=eval_, train_batch_size=16, max_epochs=2, loss="sigmoid",
        beta=0.1, packing_samples=True, save_path=tmp_path / "dpo", eval_steps=8,
    ))
    assert result["eval_acc"] >= 0.9 and result["eval_reward_margin"] > 0, result
    rows = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert {"dpo_loss", "acc", "reward_margin", "grad_norm"} <= set(next(r for r in rows if "loss" in r))
    first, last = next(r for r in rows if "loss" in r), [r for r in rows if "loss" in r][-1]
    assert last["loss"] < first["loss"] and abs(first["loss"] - math.log(2.0)) < 0.01  # starts at the reference

    # the saved folder is a plain HF causal LM; with plain transformers (one sequence at a time), the
    # implicit reward beta * (log pi - log ref) orders the eval pairs exactly as our evaluation did
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo").eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "dpo")
    correct, margins = 0, []
    for line in eval_.read_text().splitlines():
        row = train_dpo.validate_dpo_pair(json.loads(line), PreferenceKeys(margin_key="strength"), False)
        pair = tokenize_preference(tok, row, max_len=96)
        reward = [0.1 * (response_logprob(policy, ids, n) - response_logprob(reference, ids, n))
                  for ids, n in ((pair.chosen, pair.chosen_prompt_len), (pair.rejected, pair.rejected_prompt_len))]
        correct += reward[0] > reward[1]
        margins.append(reward[0] - reward[1])
    assert correct / len(margins) == result["eval_acc"]
    assert abs(sum(margins) / len(margins) - result["eval_reward_margin"]) < 1e-4


def test_packing_and_an_on_the_fly_reference_give_the_same_curve(tiny_model_dir, prefs, tmp_path):
    train, _ = prefs
    common = dict(max_steps=4, train_batch_size=8, micro_train_batch_size=2, loss="strength", beta=0.2)
    curves = {}
    for name, extra in [("padded", {}), ("packed", {"packing_samples": True}),
                        ("packed_on_the_fly", {"packing_samples": True, "ref_on_the_fly": True})]:
        train_dpo.main(base_args(tiny_model_dir, train, tmp_path / name, **common, **extra))
        curves[name] = losses(tmp_path / name)
    assert len(curves["padded"]) == 4 and curves["padded"][-1] < curves["padded"][0]
    for name in ("packed", "packed_on_the_fly"):
        assert curves[name] == pytest.approx(curves["padded"], abs=1e-4), (name, curves)


@pytest.mark.parametrize("strength, message", [
    (None, "field 'strength': missing: --loss strength needs each pair's strength"),
    (0.3, "field 'strength': a strength must lie in [0.5, 1], got 0.3"),
])
def test_a_bad_strength_stops_before_training_naming_file_row_and_field(tiny_model_dir, tmp_path, strength, message):
    rows = [r | {"strength": 0.9} for r in preference_rows(16)]
    rows[4] = {k: v for k, v in rows[4].items() if k != "strength"} | ({} if strength is None else {"strength": strength})
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as e:
        train_dpo.main(base_args(tiny_model_dir, data, tmp_path, loss="strength"))
    assert str(e.value) == f"{data}:5: {message}"


def test_two_process_fsdp_gives_the_single_process_curve(tiny_model_dir, prefs, tmp_path):
    """Reference log-probs gathered over ranks (7 eval pairs over 2 ranks: uneven shares), FSDP
    sharding and the per-rank loss scaling give the one-process curve and evaluation."""
    train, _ = prefs
    odd_eval = write_jsonl(tmp_path / "eval7.jsonl", [r | {"strength": 0.75} for r in preference_rows(7, seed=2)])
    common = dict(eval_dataset=odd_eval, max_steps=3, train_batch_size=8, micro_train_batch_size=2, loss="strength",
                  packing_samples=True, eval_steps=2)
    run_script(str(ROOT / "train_dpo.py"), base_args(tiny_model_dir, train, tmp_path / "two", **common), nproc=2)
    one = train_dpo.main(base_args(tiny_model_dir, train, tmp_path / "one", **common))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    two_eval = [r for r in read_metrics(tmp_path / "two" / "log") if "eval_acc" in r][-1]
    for key in ("eval_loss", "eval_acc", "eval_reward_margin"):
        assert two_eval[key] == pytest.approx(one[key], abs=1e-5), key


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_and_gradients_equal_trls_dpo_trainer(tiny_model_dir, prefs, tmp_path, loss):
    """The same 6 pairs (our tokens, TRL's collator), the same policy and reference: our packed
    loss and every parameter's gradient equal TRL's ``DPOTrainer`` (fp32, 1e-5)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from models.actor import Actor

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    keys = PreferenceKeys(margin_key="strength")
    rows = [train_dpo.validate_dpo_pair(json.loads(line), keys, False) for line in prefs[0].read_text().splitlines()[:6]]
    pairs = [tokenize_preference(tok, r, max_len=96) for r in rows]

    def policy_and_reference():
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with torch.no_grad():  # a policy that has moved away from the reference: h != 0
            for p in policy.parameters():
                p.add_(0.02 * torch.randn_like(p))
        return policy, reference

    # ours: one packed micro-batch, the trainer's own functions
    policy, reference = policy_and_reference()
    cfg = train_dpo.DPOConfig.__new__(train_dpo.DPOConfig)  # the fields the loss reads, without path checks
    cfg.loss, cfg.beta, cfg.label_smoothing = loss, 0.1, 0.0
    db = train_dpo.DPOBatch(pairs, range(len(pairs)), True, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ref_lp = train_dpo.response_logps(Actor(reference), db, loss == "ipo")
    ref = torch.stack([ref_lp[: len(pairs)], ref_lp[len(pairs):]], dim=1)
    ours = train_dpo.pair_losses(Actor(policy), db, ref, cfg)[0].mean()
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}

    # TRL: its collator on the same token ids, its loss on a fresh copy of the same models
    policy, reference = policy_and_reference()
    examples = [{"prompt_ids": p.chosen[: p.chosen_prompt_len], "chosen_ids": p.chosen[p.chosen_prompt_len:],
                 "rejected_ids": p.rejected[p.rejected_prompt_len:]} for p in pairs]
    assert all(p.chosen[: p.chosen_prompt_len] == p.rejected[: p.rejected_prompt_len] for p in pairs)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=[loss], report_to="none", use_cpu=True,
                         precompute_ref_log_probs=False, bf16=False, fp16=False)
    placeholder = Dataset.from_list([{"prompt": "Hi.", "chosen": " Hello.", "rejected": " Go."}])  # not trained on
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tok, train_dataset=placeholder)
    inputs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()

    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5, rel=1e-5)
    at_the_reference = math.log(2.0) if loss == "sigmoid" else (1 / (2 * 0.1)) ** 2  # h = 0
    assert abs(ours.item() - at_the_reference) > 1e-3, ours.item()  # the policy has moved: h != 0
    for name, p in trainer.model.named_parameters():
        assert torch.allclose(our_grads[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_kill_and_resume_equals_uninterrupted(tiny_model_dir, prefs, tmp_path):
    """kill -9 after step 4's checkpoint, then the same command: the resumed run recomputes the
    reference log-probs from --pretrain before it loads the checkpoint, so its curve is the
    uninterrupted one (a reference taken from the resumed weights would change every loss)."""
    train, _ = prefs
    common = dict(max_steps=10, save_steps=1, packing_samples=True, loss="strength")
    train_dpo.main(base_args(tiny_model_dir, train, tmp_path / "full", **common))
    args = base_args(tiny_model_dir, train, tmp_path / "killed", ckpt_path=tmp_path / "killed" / "ckpt", **common)
    script = str(ROOT / "train_dpo.py")
    kill_after_checkpoint(script, args, tmp_path / "killed" / "ckpt", step=4)
    assert 4 <= len(losses(tmp_path / "killed")) < 10
    proc = run_script(script, args)  # the same command resumes
    assert "[reference]" in proc.stdout
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "full"), abs=1e-6, rel=0)
    assert [r["step"] for r in read_metrics(tmp_path / "killed" / "log") if "loss" in r] == list(range(1, 11))
