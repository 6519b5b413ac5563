"""ditfast's operators.

Each op is a public function with a plain-PyTorch reference ``<op>_ref`` beside it, registered as
a torch custom op (namespace ``torch.ops.ditfast``, with a fake implementation so
``torch.compile(fullgraph=True)`` traces it) that runs a compiled kernel where one exists for the
tensor's device: Triton kernels from ``ditfast.kernels``, C++/CUDA kernels from ``ditfast._C``.
"""

from . import dispatch
from .adaln import (
    ADALN,
    AdaLNProblem,
    adaln_layernorm,
    affine_modulation,
    adaln_layernorm_ref,
    gated_residual,
    gated_residual_adaln,
    gated_residual_adaln_ref,
    gated_residual_ref,
    modulate,
    triton_status,
)
from . import patch, timestep
from .patch import (
    PATCH,
    patch_embed,
    patch_embed_ref,
    patchify,
    patchify_ref,
    unpatchify,
    unpatchify_cfg,
    unpatchify_cfg_ref,
    unpatchify_ref,
)
from .attention import packed_attention, packed_attention_ref
from .tmsa import TMSA, relative_position_index, tmsa_attention, tmsa_attention_ref
from .timestep import TIMESTEP, timestep_embedding, timestep_embedding_ref

__all__ = [
    "dispatch", "ADALN", "AdaLNProblem", "PATCH", "TIMESTEP",
    "adaln_layernorm", "adaln_layernorm_ref",
    "gated_residual_adaln", "gated_residual_adaln_ref",
    "gated_residual", "gated_residual_ref",
    "affine_modulation", "modulate", "triton_status",
    "timestep_embedding", "timestep_embedding_ref",
    "patch_embed", "patch_embed_ref",
    "unpatchify", "unpatchify_ref",
    "patchify", "patchify_ref",
    "unpatchify_cfg", "unpatchify_cfg_ref",
    "packed_attention", "packed_attention_ref",
    "TMSA", "tmsa_attention", "tmsa_attention_ref", "relative_position_index",
]  # fmt: skip
