"""flash-attn "selected" on a CPU, for the dtype policy's test (a fake only for what cannot run
here: flash-attn's CUDA kernels).

On CUDA with flash-attn installed ``select_attn_implementation`` answers ``flash_attention_2``
and transformers dispatches attention to flash-attn's varlen kernel, which takes fp16 / bf16
only. Here: the selection is made to answer the same, transformers is let to accept the name
without the package, and the function it dispatches to is a stand-in that refuses fp32 inputs
with flash-attn's own words and otherwise computes the exact varlen SDPA. The script builds the
trainers' models through the real code (``Actor`` / ``RewardModel`` with the LM head of
``--loss logexpwithlm``, ``ShardedModel`` in a world of one), takes one optimizer step each and
prints what it saw as JSON:

    python tests/fake_flash_attention.py TINY_MODEL_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTENTION_INPUT_DTYPES: set[str] = set()


def select_flash_attention() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

    import models.actor
    from models.varlen_attention import varlen_sdpa_attention

    def flash_standin(module, query, key, value, attention_mask, **kwargs):
        ATTENTION_INPUT_DTYPES.add(str(query.dtype).removeprefix("torch."))
        if query.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        return varlen_sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS._global_mapping["flash_attention_2"] = flash_standin
    models.actor.select_attn_implementation = lambda flash_attn=None, device=None: "flash_attention_2"
    PreTrainedModel._check_and_adjust_attn_implementation = lambda self, attn, *a, **k: attn


def dtypes(tensors) -> list[str]:
    out = set()
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        out.add(str(t.dtype).removeprefix("torch."))
    return sorted(out)


def one_step(model, micro_loss) -> dict:
    totals, grad_norm, _ = model.step([[0, 1]], micro_loss)
    states = [v for s in model.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"attention": model.hf_model.config._attn_implementation, "compute_bf16": getattr(model, "bf16", None),
            "parameters": dtypes(model.module.parameters()), "optimizer_state": dtypes(states),
            "loss": float(totals["loss"]), "grad_norm": grad_norm}


def main(model_dir: str) -> dict:
    select_flash_attention()
    from models.actor import Actor
    from models.distributed import init_distributed
    from models.packing import PackedBatch
    from models.value_model import RewardModel
    from training.sharded_model import OptimSpec, ShardedModel

    env = init_distributed()
    optim = OptimSpec(learning_rate=1e-3, total_steps=1, lr_warmup_ratio=0.0)
    rows = [[1, 5, 9, 13, 17, 21], [1, 6, 10, 14]]
    batch = PackedBatch.from_sequences(rows)
    mask = batch.flat_token_mask().reshape(batch.input_ids.shape)
    seen = {}

    actor = ShardedModel(lambda: (lambda a: (a, a.model))(Actor.from_pretrained(model_dir)), env, optim=optim)

    def actor_loss(micro):
        lp = actor(batch, token_mask=mask).log_probs
        loss = -lp.sum() / mask.sum()
        return loss, {"loss": loss.detach()}, batch.num_tokens

    seen["actor"] = one_step(actor, actor_loss)

    rm = ShardedModel(lambda: (lambda m: (m, m.model))(RewardModel.from_pretrained(model_dir, with_lm_head=True)), env,
                      optim=optim)

    def rm_loss(micro):
        rewards, lm_logps = rm(batch, mask)  # --loss logexpwithlm: the LM term from the same pass
        loss = torch.nn.functional.softplus(rewards[1] - rewards[0]) - 0.1 * lm_logps.sum() / mask.sum()
        return loss, {"loss": loss.detach()}, batch.num_tokens

    seen["reward_model_with_lm_head"] = one_step(rm, rm_loss)
    seen["attention_input_dtypes"] = sorted(ATTENTION_INPUT_DTYPES)
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
