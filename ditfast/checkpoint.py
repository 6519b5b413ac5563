"""Loading DiT checkpoints: official releases, training checkpoints and safetensors files."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import torch

from .models import DiT, DiT_models, heads_for_hidden

__all__ = ["load_model", "load_state_dict", "infer_config", "infer_block", "check_state_dict"]

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Return the model weights held by ``source`` as a flat ``{name: tensor}`` dict on the CPU.

    ``source`` is a path to a ``.pt``/``.pth`` file (loaded with ``weights_only=True``) or a
    ``.safetensors`` file, or an already loaded dict. An official release is a bare state_dict; a
    training checkpoint ``{"model", "ema", "opt", "args", ...}`` yields its ``"ema"`` weights (or
    ``"model"`` when it has no EMA).
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    elif isinstance(source, Mapping):
        obj = source
    else:
        raise ValueError(f"expected a checkpoint path or a state_dict mapping, got {type(source).__name__}")

    if isinstance(obj, Mapping) and "pos_embed" not in obj:
        for key in ("ema", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            "checkpoint holds neither a state_dict of tensors nor a training checkpoint with an "
            f"'ema' or 'model' state_dict (top-level keys: {sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__})"
        )
    # checkpoints saved from DistributedDataParallel or torch.compile carry a name prefix
    return {_strip_prefix(k): v for k, v in obj.items()}


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _saved_config(source) -> dict[str, Any]:
    """The DiT config a ``.safetensors`` file carries in its metadata (``ditfast train --export``)."""
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(os.fspath(source), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["ditfast_config"]) if "ditfast_config" in meta else {}


def infer_config(
    state_dict: Mapping[str, torch.Tensor], class_dropout_prob: float = 0.1, num_heads: int | None = None
) -> dict[str, Any]:
    """DiT constructor arguments implied by a state_dict's tensor shapes.

    Heads (which no shape shows) are ``num_heads`` when given, else the registry's rule (see
    :func:`ditfast.models.heads_for_hidden`). The label table
    has ``num_classes + 1`` rows when ``class_dropout_prob > 0`` (the null class), else
    ``num_classes`` rows. The block design is read from the tensor names and shapes
    (:func:`infer_block`).
    """
    needed = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise ValueError(f"cannot infer the DiT config: the state_dict lacks {missing}")
    proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    tokens = state_dict["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))), default=-1)
    out_dim = state_dict["final_layer.linear.weight"].shape[0]
    if out_dim not in (patch * patch * in_channels, 2 * patch * patch * in_channels):
        raise ValueError(
            f"final_layer.linear has {out_dim} outputs; expected {patch * patch * in_channels} or "
            f"{2 * patch * patch * in_channels} for patch {patch} and {in_channels} channels"
        )
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    config: dict[str, Any] = dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads or heads_for_hidden(hidden),
        class_dropout_prob=class_dropout_prob,
        num_classes=rows - 1 if class_dropout_prob > 0 else rows,
        learn_sigma=out_dim == 2 * patch * patch * in_channels,
        block=infer_block(state_dict),
    )
    if "blocks.0.mlp.fc1.weight" in state_dict:
        config["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    return config


def infer_block(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The block design (``DiT(block=...)``) a state_dict was saved from, by its tensors.

    A cross-attention layer (``blocks.0.cross_attn.*``): "cross-attention". An adaLN modulation of
    6*D outputs per block: "adaLN-Zero" (shift, scale and gate, twice); of 4*D: "adaLN" (no gates).
    Neither (standard affine LayerNorms, ``blocks.0.norm1.weight``): "in-context". Without blocks
    only the final layer tells, adaptive or not; the two designs of each kind then have the same
    tensors and compute the same function: "adaLN-Zero" or "in-context" is taken.
    """
    if "blocks.0.cross_attn.q.weight" in state_dict:
        return "cross-attention"
    modulation = state_dict.get("blocks.0.adaLN_modulation.1.weight")
    if modulation is not None:
        widths = {6: "adaLN-Zero", 4: "adaLN"}
        ratio, rest = divmod(modulation.shape[0], modulation.shape[1])
        if rest or ratio not in widths:
            raise ValueError(
                f"blocks.0.adaLN_modulation.1.weight has shape {tuple(modulation.shape)}: expected (6D, D) "
                "(adaLN-Zero) or (4D, D) (adaLN)"
            )
        return widths[ratio]
    if "blocks.0.norm1.weight" in state_dict:
        return "in-context"
    return "adaLN-Zero" if "final_layer.adaLN_modulation.1.weight" in state_dict else "in-context"


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError listing every missing key, unexpected key and shape conflict, if any."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    conflicts = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or conflicts:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if conflicts:
            parts.append(f"shape conflicts ({len(conflicts)}): {'; '.join(conflicts)}")
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(parts))


def load_model(
    source: str | os.PathLike | Mapping[str, Any],
    model: str | DiT | None = None,
    device: torch.device | str | None = None,
    **config: Any,
) -> DiT:
    """Build (or fill) a DiT from a checkpoint and return it in eval mode.

    ``source``: see :func:`load_state_dict`. ``model``: None to infer the architecture from the
    tensors (any of the DiT constructor arguments in ``config`` override what is inferred, e.g.
    ``num_heads`` for a non-registry width), a registry name such as ``"DiT-XL/2"`` (then
    ``config`` such as ``input_size`` and ``num_classes`` is passed to it, with ``input_size`` and
    ``num_classes`` inferred when not given), or an existing DiT to load into. Every key and shape
    must match; the error lists all mismatches.
    """
    state_dict = load_state_dict(source)
    if isinstance(model, DiT):
        if config:
            raise ValueError("config overrides apply only when load_model builds the model")
        net = model
    else:
        saved = _saved_config(source)
        heads = config.get("num_heads", saved.get("num_heads"))
        inferred = {**infer_config(state_dict, config.get("class_dropout_prob", 0.1), heads), **saved}
        if model is not None and model not in DiT_models:
            raise ValueError(f"unknown model {model!r}; expected one of {sorted(DiT_models)}")
        # Built on the meta device (no random init of weights that are overwritten anyway).
        with torch.device("meta"):
            if model is None:
                net = DiT(**{**inferred, **config})
            else:
                kwargs = {k: inferred[k] for k in ("input_size", "num_classes", "learn_sigma", "in_channels", "block")}
                net = DiT_models[model](**{**kwargs, **config})
    check_state_dict(net, state_dict)
    if isinstance(model, DiT):
        net.load_state_dict(state_dict, strict=True)
    else:
        # assign the tensors (no copy), in the default dtype as a freshly built model would be
        dtype = torch.get_default_dtype()
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        net.load_state_dict(state_dict, strict=True, assign=True)
    if device is not None:
        net = net.to(device)
    return net.eval()
