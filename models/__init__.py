"""The shared core: tiny models, packing, varlen attention, FSDP, actor / reward / critic heads.

Importing the package registers the ``varlen_sdpa`` attention implementation with transformers,
so ``from_pretrained(..., attn_implementation="varlen_sdpa")`` works anywhere ``models`` is used.
"""

from models import varlen_attention as _varlen_attention  # noqa: F401  (registers varlen_sdpa)
