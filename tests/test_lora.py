"""LoRA (models/lora.py) through the trainers: only the adapters (and a value model's score head)
train, their count is r x (in + out) per adapted layer, the saved folder holds merged plain
weights whose outputs equal the base model + the saved adapter run by peft, and under FSDP2 with
2 ranks the run equals one process (frozen and trainable parameters in the same FSDP units)."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import train_dpo
import train_rm_llama2
import train_sft
from models.lora import LoraSpec, add_lora, merge_lora, parameter_counts
from tests.synthetic_data import write_preference_split
from tests.trainer_runs import base_args, losses, run_script

ROOT = Path(__file__).resolve().parents[1]
CHATS = ROOT / "models" / "assets" / "tiny_chat_corpus.jsonl"
LORA = dict(lora_rank=4, lora_alpha=8)


def decoder_linears(model) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in ("lm_head", "score")]


def test_only_adapters_and_the_score_head_train_and_their_count_is_r_times_in_plus_out(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linears = decoder_linears(model)
    add_lora(model, LoraSpec(rank=4))
    trainable, total = parameter_counts(model)
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    add_lora(rm, LoraSpec(rank=4, target_modules=("q_proj", "v_proj")))
    names = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "score.weight" in names and not any("k_proj.lora" in n or "score.lora" in n for n in names)
    assert all("q_proj.lora" in n or "v_proj.lora" in n for n in names - {"score.weight"})


def test_merge_equals_the_adapter_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = add_lora(model, LoraSpec(rank=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at 0: give the adapters something to merge
                p.normal_(0.0, 0.05)
    ids = torch.randint(5, 4000, (2, 20))
    want = model.eval()(ids).logits
    # the live tensors themselves, as a one-rank gather returns them: merging must not touch them
    merged = merge_lora(model, model.state_dict(), config)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain.load_state_dict(merged)
    assert torch.allclose(plain.eval()(ids).logits, want, atol=1e-5)
    assert torch.equal(model(ids).logits, want)  # the adapted model is unchanged (a sync every step relies on it)


def sft_lora_args(tiny_model_dir, out: Path, **kw) -> list[str]:
    args = dict(max_len=128, learning_rate=5e-2, train_batch_size=8, max_steps=6, packing_samples=True, **LORA) | kw
    return base_args(tiny_model_dir, CHATS, out, **args)


def test_sft_lora_saves_merged_weights_that_equal_base_plus_adapter(tiny_model_dir, tmp_path):
    train_sft.main(sft_lora_args(tiny_model_dir, tmp_path, save_path=tmp_path / "sft", save_adapter=True))
    curve = losses(tmp_path)
    assert curve[-1] < curve[0] - 0.1, curve  # a random model with frozen embeddings: adapters alone move slowly

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()  # a plain folder: no adapter files
    assert not (tmp_path / "sft" / "adapter_config.json").exists()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "sft" / "adapter").eval()
    ids = torch.randint(5, 4000, (2, 24))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)

    base, after = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), merged.state_dict()
    for name, t in base.items():  # frozen weights are bit-identical; every adapted one moved
        moved = not torch.equal(after[name], t)
        assert moved == name.endswith("proj.weight"), name


def test_lora_on_two_fsdp_ranks_equals_one_process(tiny_model_dir, tmp_path):
    weights = {}
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        run_script(str(ROOT / "train_sft.py"), sft_lora_args(tiny_model_dir, out, max_steps=3, save_path=out / "sft"), nproc=nproc)
        weights[nproc] = (losses(out), AutoModelForCausalLM.from_pretrained(out / "sft").state_dict())
    assert weights[2][0] == pytest.approx(weights[1][0], abs=1e-4)
    for name, t in weights[1][1].items():
        assert torch.allclose(weights[2][1][name], t, atol=2e-5), name


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_preference_split(tmp_path_factory.mktemp("lora_prefs"), 128)


def test_rm_and_dpo_learn_with_adapters(tiny_model_dir, prefs, tmp_path):
    train, eval_ = prefs
    common = dict(eval_dataset=eval_, train_batch_size=16, max_epochs=2, packing_samples=True, learning_rate=1e-2, **LORA)
    rm = train_rm_llama2.main(base_args(tiny_model_dir, train, tmp_path / "rm", save_path=tmp_path / "rm" / "model", **common))
    assert rm["eval_acc"] >= 0.9, rm
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert torch.equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"])

    dpo = train_dpo.main(base_args(tiny_model_dir, train, tmp_path / "dpo", loss="sigmoid", beta=0.1, **common))
    assert dpo["eval_acc"] >= 0.9 and dpo["eval_reward_margin"] > 0, dpo
