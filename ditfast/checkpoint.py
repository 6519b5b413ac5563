"""Loading DiT checkpoints: official releases, training checkpoints and safetensors files."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from typing import Any, Mapping

import torch

from .errors import CheckpointError, check_float, check_int, resolve_device
from .diffit import DiffiT, DiffiT_models
from .diffit_unet import DiffiTUNet, DiffiTUNet_models, infer_unet_config, is_unet_state_dict
from .models import SIZES, DiT, DiT_models, heads_for_hidden

__all__ = ["load_model", "load_state_dict", "infer_config", "infer_block", "check_state_dict", "recorded_config",
           "CheckpointError", "is_diffit", "MODELS"]

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")

# Every registry name load_model, the sampler and the trainer take: DiT's and DiffiT's.
MODELS = {**DiT_models, **DiffiT_models, **DiffiTUNet_models}
MODEL_TYPES = (DiT, DiffiT, DiffiTUNet)


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Return the model weights held by ``source`` as a flat ``{name: tensor}`` dict on the CPU.

    ``source`` is a path to a ``.pt``/``.pth`` file (loaded with ``weights_only=True``) or a
    ``.safetensors`` file, or an already loaded dict. An official release is a bare state_dict; a
    training checkpoint ``{"model", "ema", "opt", "args", ...}`` yields its ``"ema"`` weights (or
    ``"model"`` when it has no EMA).
    """
    return _read(source)[0]


def _read(source) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the state_dict of :func:`load_state_dict`, the DiT config the source records: a
    ``.safetensors`` file's ``ditfast_config`` metadata or a training checkpoint's ``args``, see
    :func:`recorded_config`; {} when it records none). A file that cannot be used raises
    :class:`CheckpointError` naming it and what is wrong."""
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if os.path.getsize(path) == 0:
            raise CheckpointError(path, "the file is empty")
        obj: Any = _load_safetensors(path) if path.endswith(".safetensors") else _load_pt(path)
    elif isinstance(source, Mapping):
        obj = source
    else:
        raise TypeError(f"source must be a checkpoint path or a state_dict mapping, got {type(source).__name__}")

    def bad(problem: str):
        return CheckpointError(path, problem) if path is not None else ValueError(problem)

    saved: dict[str, Any] = {}
    if path is not None and path.endswith(".safetensors"):
        obj, saved = obj
    elif isinstance(obj, Mapping) and "pos_embed" not in obj and isinstance(obj.get("args"), Mapping):
        saved = recorded_config(obj["args"], path or "the training checkpoint")
    if isinstance(obj, Mapping) and "pos_embed" not in obj:
        for key in ("ema", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise bad(
            "checkpoint holds neither a state_dict of tensors nor a training checkpoint with an "
            f"'ema' or 'model' state_dict (top-level keys: {sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__})"
        )
    # (DiffiT's relative_position_index buffers and the image-space DiffiT's input_size_ are the
    # integer tensors a model holds)
    not_float = [f"{k} ({v.dtype})" for k, v in obj.items()
                 if not v.is_floating_point() and not str(k).endswith(("relative_position_index", "input_size_"))]  # fmt: skip
    if not_float:
        raise bad(f"DiT weights are floating point, but {len(not_float)} tensor(s) are not: {', '.join(not_float[:4])}"
                  f"{' ...' if len(not_float) > 4 else ''}")
    # checkpoints saved from DistributedDataParallel or torch.compile carry a name prefix
    return {_strip_prefix(str(k)): v for k, v in obj.items()}, saved


def _load_pt(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with every failure as a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text goes on to suggest turning the safe loader off: only its diagnosis is kept
        detail = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), "")
        raise CheckpointError(path, "the file holds pickled Python objects other than tensors and plain containers, "
                                    "which the safe (weights only) loader does not run"
                                    f"{': ' + detail if detail else ''}; a DiT checkpoint holds only tensors") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot be read: {e.strerror or e}") from None
    except Exception as e:  # EOFError, torch's zip reader's RuntimeError, KeyError/ValueError of a foreign file, ...
        raise CheckpointError(path, f"not a readable PyTorch checkpoint (truncated, corrupt or another format): "
                                    f"{type(e).__name__}: {_first_line(e)}") from None


def _load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, the DiT config in the ``ditfast_config`` metadata) of a ``.safetensors`` file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:
        raise CheckpointError(path, f"cannot be read: {e.strerror or e}") from None
    except Exception as e:  # safetensors' SafetensorError: bad header, truncated data, invalid JSON, ...
        raise CheckpointError(path, f"not a valid .safetensors file: {_first_line(e)}") from None
    if "ditfast_config" not in meta:
        return tensors, {}
    try:
        config = json.loads(meta["ditfast_config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"its ditfast_config metadata is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, f"its ditfast_config metadata must be a JSON object, got {type(config).__name__}")
    return tensors, config


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "(no message)"


# what a training run's args (ditfast.train.TrainConfig) say about the DiT it trained
_RECORDED = ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "block", "learn_sigma", "class_dropout_prob")


def recorded_config(args: Mapping[str, Any], where: str = "the checkpoint") -> dict[str, Any]:
    """The DiT constructor arguments a training checkpoint's ``args`` record: its explicit sizes
    (``hidden_size``, ``depth``, ``num_heads``, ``patch_size``) or, where one is None, the size of
    its registry ``model`` ("DiT-S/2": depth 12, hidden 384, 6 heads, patch 2), and its
    ``mlp_ratio``, ``block``, ``learn_sigma`` and ``class_dropout_prob``. Heads are recorded nowhere
    else: the tensors do not show them."""
    config: dict[str, Any] = {}
    name = args.get("model")
    size = name.removeprefix("DiffiT-").removeprefix("DiT-").split("/") if isinstance(name, str) else []
    if len(size) == 2 and size[0] in SIZES and size[1].isdigit():
        depth, hidden, heads = SIZES[size[0]]
        config.update(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(size[1]))
    for key in _RECORDED:
        if args.get(key) is not None:
            config[key] = args[key]
    if isinstance(name, str) and name.startswith("DiffiT-"):
        config.pop("block", None)  # (a DiffiT has no block designs; the trainer records the DiT default)
    if "num_heads" in config and not _valid_heads(config):
        raise CheckpointError(where, f"its recorded args give num_heads {config['num_heads']!r}, which does not divide "
                                     f"hidden_size {config.get('hidden_size')!r}")  # fmt: skip
    return config


def _valid_heads(config: Mapping[str, Any]) -> bool:
    heads, hidden = config.get("num_heads"), config.get("hidden_size")
    return isinstance(heads, int) and heads >= 1 and (not isinstance(hidden, int) or hidden % heads == 0)


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


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
    check_float("class_dropout_prob", class_dropout_prob, 0.0, 1.0)
    if num_heads is not None:
        check_int("num_heads", num_heads, min=1)
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
        num_heads=num_heads or (None if is_diffit(state_dict) else heads_for_hidden(hidden)),  # DiffiT: below
        class_dropout_prob=class_dropout_prob,
        num_classes=rows - 1 if class_dropout_prob > 0 else rows,
        learn_sigma=out_dim == 2 * patch * patch * in_channels,
        block=infer_block(state_dict),
    )
    if "blocks.0.mlp.fc1.weight" in state_dict:
        config["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    if is_diffit(state_dict):  # no block designs; the heads (and the window) from the bias table
        del config["block"]
        config["num_heads"] = _diffit_heads(state_dict, grid, hidden, num_heads)
    return config


def is_diffit(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state_dict is a latent DiffiT's (:class:`ditfast.DiffiT`): its blocks' attention
    has a relative position bias table; without blocks, its final layer is a bare Linear (a DiT's
    has an adaLN modulation or an affine LayerNorm)."""
    if "blocks.0.attn.relative_position_bias_table" in state_dict:
        return True
    final = {k for k in state_dict if k.startswith("final_layer.")}
    no_blocks = not any(_BLOCK_KEY.match(k) for k in state_dict)
    return no_blocks and final == {"final_layer.linear.weight", "final_layer.linear.bias"}


def _diffit_heads(state_dict: Mapping[str, torch.Tensor], grid: int, hidden: int, num_heads: int | None) -> int:
    """A DiffiT's head count: the bias table's ((2w-1)^2, Hd) second dim, its window w the token grid
    (``num_heads``, when given, must agree)."""
    table = state_dict.get("blocks.0.attn.relative_position_bias_table")
    if table is None:  # no blocks: nothing shows the heads
        return num_heads or heads_for_hidden(hidden)
    entries, heads = table.shape
    if num_heads is not None and num_heads != heads:
        raise ValueError(f"num_heads={num_heads} contradicts the checkpoint: its relative position bias table "
                         f"{tuple(table.shape)} has {heads} heads")  # fmt: skip
    if entries != (2 * grid - 1) ** 2:
        raise ValueError(f"blocks.0.attn.relative_position_bias_table has {entries} rows; a DiffiT whose "
                         f"pos_embed is a {grid}x{grid} token grid has a window of {grid} and (2*{grid}-1)^2 = "
                         f"{(2 * grid - 1) ** 2} rows")  # fmt: skip
    return heads


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
    model: str | DiT | DiffiT | None = None,
    device: torch.device | str | None = None,
    **config: Any,
) -> DiT | DiffiT:
    """Build (or fill) a DiT or a DiffiT from a checkpoint and return it in eval mode.

    ``source``: see :func:`load_state_dict`. ``model``: None to infer the architecture from the
    tensors (any of the DiT constructor arguments in ``config`` override what is inferred, e.g.
    ``num_heads`` for a non-registry width), a registry name such as ``"DiT-XL/2"`` (then
    ``config`` such as ``input_size`` and ``num_classes`` is passed to it, with ``input_size`` and
    ``num_classes`` inferred when not given), or an existing DiT to load into. Every key and shape
    must match; the error lists all mismatches. A DiffiT checkpoint (the release's state_dict or
    ``diffit_256/512.safetensors``, or one ``ditfast train --model DiffiT-...`` wrote) is recognised
    by its tensors (:func:`is_diffit`) and built as a :class:`ditfast.DiffiT`, its heads read from
    the relative position bias table; registry names include ``"DiffiT-XL/2"``. An image-space
    DiffiT (:class:`ditfast.DiffiTUNet`, names ``"DiffiT-CIFAR"``, ``"DiffiT-Digits16"`` ...) is
    recognised by its tensors too and rebuilt from them (:func:`ditfast.diffit_unet.infer_unet_config`).

    What the file records about the model is read before anything is guessed from the tensors: a
    training checkpoint's ``args`` (:func:`recorded_config`; the only place its head count is
    kept) or a ``.safetensors`` file's ``ditfast_config``. A record that contradicts the tensors,
    or a ``num_heads`` override that contradicts the record, is refused. A corrupt or foreign file
    raises :class:`CheckpointError`; ``device`` is resolved first (:func:`ditfast.errors.resolve_device`).

    A folder is read as diffusers' ``DiTTransformer2DModel`` (``config.json`` + weights) or a
    pipeline root with ``transformer/``: :func:`ditfast.interop.diffusers.load_diffusers` builds a
    DiT with diffusers' numerics (``config`` may hold only ``backend``/``attn_backend`` then).
    """
    target = resolve_device(device) if device is not None else None
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):  # a diffusers DiT folder or pipeline root
        if model is not None:
            raise ValueError(f"model must be None for a diffusers folder (its config.json fixes the architecture), got {model!r}")
        from .interop.diffusers import load_diffusers

        return load_diffusers(source, device=target, **config)
    if model is not None and not isinstance(model, MODEL_TYPES) and (not isinstance(model, str) or model not in MODELS):
        raise ValueError(f"unknown model {model!r}; expected a DiT, a DiffiT, None or one of {sorted(MODELS)}")
    if isinstance(model, MODEL_TYPES) and config:
        raise ValueError("config overrides apply only when load_model builds the model")
    state_dict, saved = _read(source)
    if isinstance(model, DiffiTUNet) or model in DiffiTUNet_models or (model is None and is_unet_state_dict(state_dict)):
        return _load_unet(state_dict, saved, model, target, config)
    if isinstance(model, MODEL_TYPES):
        net = model
    else:
        where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the state_dict"
        if "num_heads" in config and "num_heads" in saved and config["num_heads"] != saved["num_heads"]:
            raise ValueError(f"num_heads={config['num_heads']!r} contradicts {where}, which records "
                             f"num_heads {saved['num_heads']!r}: leave num_heads out")  # fmt: skip
        heads = config.get("num_heads", saved.get("num_heads"))
        dropout = config.get("class_dropout_prob", saved.get("class_dropout_prob", 0.1))
        inferred = infer_config(state_dict, dropout, heads)
        _check_recorded(saved, inferred, state_dict, where)
        inferred = {**inferred, **saved}
        # Built on the meta device (no random init of weights that are overwritten anyway).
        with torch.device("meta"):
            if model is None:
                net = (DiffiT if is_diffit(state_dict) else DiT)(**{**inferred, **config})
            else:
                keys = ("input_size", "num_classes", "learn_sigma", "in_channels") + (("block",) if model in DiT_models and "block" in inferred else ())
                net = MODELS[model](**{**{k: inferred[k] for k in keys}, **config})
    check_state_dict(net, state_dict)
    if isinstance(model, MODEL_TYPES):
        net.load_state_dict(state_dict, strict=True)
    else:
        # assign the tensors (no copy), in the default dtype as a freshly built model would be
        dtype = torch.get_default_dtype()
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        net.load_state_dict(state_dict, strict=True, assign=True)
    if target is not None:
        net = net.to(target)
    return net.eval()


def _load_unet(state_dict, saved: Mapping[str, Any], model, target, config: Mapping[str, Any]) -> DiffiTUNet:
    """:func:`load_model` for the image-space DiffiT (:mod:`ditfast.diffit_unet`): the config from
    the tensors (:func:`~ditfast.diffit_unet.infer_unet_config`), what the file records of it, then
    ``config``; a registry name keeps its architecture and takes the sizes from the tensors."""
    if not is_unet_state_dict(state_dict):
        raise ValueError(f"model {model if isinstance(model, str) else type(model).__name__!r} is an image-space DiffiT, "
                         "but the checkpoint holds another model's tensors")  # fmt: skip
    if isinstance(model, DiffiTUNet):
        net = model
        check_state_dict(net, state_dict)
        net.load_state_dict(state_dict, strict=True)
    else:
        inferred = infer_unet_config(state_dict, config.get("class_dropout_prob", saved.get("class_dropout_prob", 0.1)))
        inferred.update({k: v for k, v in saved.items() if k in inferred and k not in ("mlp_ratio",)})
        with torch.device("meta"):
            if model is None:
                net = DiffiTUNet(**{**inferred, **config})
            else:
                sizes = {k: inferred[k] for k in ("input_size", "in_channels", "num_classes", "class_dropout_prob")}
                net = DiffiTUNet_models[model](**{**sizes, **config})
        check_state_dict(net, state_dict)
        dtype = torch.get_default_dtype()
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        net.load_state_dict(state_dict, strict=True, assign=True)
    return (net.to(target) if target is not None else net).eval()


def _check_recorded(saved: Mapping[str, Any], inferred: Mapping[str, Any], state_dict, where: str) -> None:
    """Refuse a recorded config that contradicts what the tensors show (a file edited or mixed up)."""
    conflicts = []
    for key, value in saved.items():
        if key in ("num_heads", "class_dropout_prob") or key not in inferred:
            continue  # not visible in the tensors
        if key == "mlp_ratio":
            hidden = inferred["hidden_size"]
            rows = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
            if not isinstance(value, (int, float)) or int(hidden * value) != rows:
                conflicts.append(f"mlp_ratio {value!r} recorded, but the MLP has {rows} hidden units for width {hidden}")
        elif value != inferred[key]:
            conflicts.append(f"{key} {value!r} recorded, {inferred[key]!r} in the tensors")
    if conflicts:
        raise CheckpointError(where, "the config it records contradicts its tensors: " + "; ".join(conflicts))
