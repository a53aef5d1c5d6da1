"""Variable-length (packed) attention for HF decoder models, on any device.

A packed row holds several samples; attention must be causal *inside* each sample and zero across
samples (block-diagonal causal). transformers routes ``cu_seq_lens_q/k`` and ``max_length_q/k``
(see ``PackedBatch.attention_kwargs``) to the attention function of the model:

* ``flash_attention_2`` (CUDA + flash-attn): ``flash_attn_varlen_func`` with those ``cu_seqlens``.
* ``varlen_sdpa`` (registered here; CPU, or CUDA without flash-attn): one SDPA call per sample.
  Without ``cu_seq_lens`` (ordinary padded batches, ``generate``) it is exactly transformers' SDPA.

Why our own function: non-flash attention in transformers ignores ``cu_seq_lens`` and infers
segments from ``position_ids`` only when no cache and no attention mask are present; any
``attention_mask`` (even all ones) or the config's default ``use_cache=True`` silently turns a
packed row into plain causal attention across samples. Here the boundaries are explicit.

Per-sample SDPA versus one SDPA with a block-diagonal mask: ``benchmarks/varlen_attention.py``
measures both; the loop does sum(L_i^2) work instead of T^2 and won on every shape we tried, so
it is the implementation; the masked variant stays as the reference in tests and the benchmark.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

logger = logging.getLogger(__name__)

VARLEN_SDPA = "varlen_sdpa"
FLASH_ATTENTION_2 = "flash_attention_2"


def _check_packed(module: torch.nn.Module, query: torch.Tensor, kwargs: dict) -> torch.Tensor:
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one row (batch 1), got batch {query.shape[0]}")
    if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise ValueError("varlen_sdpa supports self-attention only (cu_seq_lens_q == cu_seq_lens_k)")
    if getattr(module, "sliding_window", None):
        raise NotImplementedError("varlen_sdpa does not implement sliding-window attention; use flash-attn")
    if int(cu_q[-1]) != query.shape[2]:
        raise ValueError(f"cu_seq_lens ends at {int(cu_q[-1])} but the row has {query.shape[2]} tokens")
    return cu_q


def per_sample_sdpa(q, k, v, cu_seqlens: torch.Tensor, dropout: float, scale: float | None) -> torch.Tensor:
    """Block-diagonal causal attention, ``softmax(q_i k_i^T * scale + causal) v_i`` for each
    sample i, as one SDPA call per sample: sum(L_i^2) work. q ``(1, H, T, D)``, k/v ``(1, H_kv, T, D)``."""
    cu = cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]
    outs = [
        F.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
            dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=gqa,
        )
        for s, e in zip(cu[:-1], cu[1:])
    ]
    return torch.cat(outs, dim=2)


def block_diagonal_causal_mask(cu_seqlens: torch.Tensor, device=None) -> torch.Tensor:
    """``(T, T)`` bool mask, True where query t may attend key s: same sample and s <= t."""
    cu = cu_seqlens.long().to(device)
    lengths = cu[1:] - cu[:-1]
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    t = torch.arange(int(cu[-1]), device=device)
    return (segment[:, None] == segment[None, :]) & (t[None, :] <= t[:, None])


def masked_sdpa(q, k, v, cu_seqlens: torch.Tensor, dropout: float, scale: float | None) -> torch.Tensor:
    """The same attention as one SDPA call with a ``(T, T)`` block-diagonal mask: T^2 work and
    memory. Kept as an independent reference for tests and the benchmark."""
    mask = block_diagonal_causal_mask(cu_seqlens, device=q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def packed_attention_function(packed_kernel):
    """A transformers attention function: ``packed_kernel`` on packed rows (``cu_seq_lens_q`` in
    the kwargs; any ``attention_mask`` is ignored there), transformers' SDPA otherwise. Returns
    ``(1, T, H, D)`` like every transformers attention function."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if kwargs.get("cu_seq_lens_q") is None:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        cu = _check_packed(module, query, kwargs)
        out = packed_kernel(query, key, value, cu, dropout, scaling)
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = f"{packed_kernel.__name__}_attention"
    return attention


varlen_sdpa_attention = packed_attention_function(per_sample_sdpa)
masked_sdpa_attention = packed_attention_function(masked_sdpa)


def register_varlen_attention() -> None:
    """Make ``attn_implementation="varlen_sdpa"`` (and ``"masked_sdpa"``) loadable by transformers.
    Padded batches keep transformers' SDPA masks, so the same model also serves ``generate``."""
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    AttentionInterface.register("masked_sdpa", masked_sdpa_attention)
    AttentionMaskInterface.register("masked_sdpa", sdpa_mask)


register_varlen_attention()


# attention implementations whose kernels take fp16 / bf16 only
HALF_PRECISION_ONLY = (FLASH_ATTENTION_2, "flash_attention_3")


def needs_half_precision(model) -> bool:
    """``model``'s attention runs kernels that take half precision only (flash-attn): its compute
    must be bf16 whatever ``--bf16`` says (its weights need not be)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in HALF_PRECISION_ONLY


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_attn_implementation(flash_attn: bool | None = None, device: torch.device | str | None = None) -> str:
    """Pick the packed-attention implementation for this machine.

    ``flash_attn=None`` (auto): flash-attn varlen kernels when CUDA and the package are present,
    else ``varlen_sdpa``. ``flash_attn=True`` (the seed's ``--flash_attn``) insists on flash-attn on
    CUDA, with a clear error when the package is missing; on a CPU it falls back with a warning,
    since flash-attn has no CPU kernels. ``flash_attn=False`` always gives ``varlen_sdpa``.
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if flash_attn is False:
        return VARLEN_SDPA
    if device.type != "cuda":
        if flash_attn:
            logger.warning("--flash_attn: flash-attn needs CUDA; on %s packed attention uses %s", device, VARLEN_SDPA)
        return VARLEN_SDPA
    if flash_attn_available():
        return FLASH_ATTENTION_2
    if flash_attn:
        raise RuntimeError(
            "--flash_attn was given but the flash-attn package is not installed. Install it with "
            "`pip install --no-build-isolation flash-attn` (it compiles against your torch/CUDA), "
            "or drop --flash_attn to use the exact SDPA fallback (slower on long rows)."
        )
    return VARLEN_SDPA
