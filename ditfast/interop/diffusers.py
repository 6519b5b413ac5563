"""diffusers' DiT, both ways: load a ``DiTTransformer2DModel`` folder as a ditfast DiT, save a DiT
as such a folder, and stand in for the transformer inside diffusers' ``DiTPipeline``.

A diffusers DiT folder is ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``,
or sharded with a ``.safetensors.index.json``); a pipeline root holds one as ``transformer/``,
beside ``vae/`` and ``scheduler/``. Reading and writing folders needs only safetensors; diffusers
itself is imported only by :func:`diffusers_transformer` (for its output type).

diffusers computes the same architecture with three numeric differences from the official
release, read from its source (``models/embeddings.py``, ``models/attention.py``,
``models/normalization.py``, ``models/transformers/dit_transformer_2d.py``, version 0.42):

- timestep features: ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)``, i.e. the
  frequency exponent is divided by 127 instead of 128 (hard-coded, not in ``config.json``);
- the LayerNorm before each block's MLP (``norm3``) uses ``config.norm_eps`` (default 1e-5); the
  one before attention (``norm1.norm``) and the final one (``norm_out``) use 1e-6 as officially;
- every block holds its own timestep and label embedder (``norm1.emb``); the final layer is
  conditioned by block 0's. Converted official checkpoints have them all equal.

A loaded folder becomes ``DiT(..., timestep_freq_shift=1, mlp_norm_eps=config.norm_eps)``, which
reproduces diffusers' output; a folder whose per-block embedders differ is refused (ditfast's DiT
has one embedder for all blocks), as is any config field ditfast cannot represent.

Weight names (diffusers -> ditfast): ``pos_embed.proj`` -> ``x_embedder.proj``;
``transformer_blocks.0.norm1.emb.timestep_embedder.linear_{1,2}`` -> ``t_embedder.mlp.{0,2}``;
``transformer_blocks.0.norm1.emb.class_embedder.embedding_table`` ->
``y_embedder.embedding_table``; per block i, ``norm1.linear`` -> ``blocks.i.adaLN_modulation.1``,
``attn1.to_{q,k,v}`` -> ``blocks.i.attn.qkv`` (rows [q | k | v]), ``attn1.to_out.0`` ->
``blocks.i.attn.proj``, ``ff.net.0.proj`` / ``ff.net.2`` -> ``blocks.i.mlp.fc1`` / ``fc2``;
``proj_out_1`` / ``proj_out_2`` -> ``final_layer.adaLN_modulation.1`` / ``final_layer.linear``.
diffusers' position table is a non-persistent buffer (the same sin-cos table), not saved.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..files import atomic_write
from ..models import DiT, get_2d_sincos_pos_embed

__all__ = [
    "DiffusersTransformer",
    "diffusers_transformer",
    "is_diffusers_folder",
    "transformer_folder",
    "pipeline_vae",
    "dit_config",
    "from_diffusers_state_dict",
    "load_diffusers",
    "to_diffusers",
    "save_diffusers",
    "InexactExportWarning",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
BIN_NAME = "diffusion_pytorch_model.bin"
CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")  # the second: the older name of the same config
DIFFUSERS_TIMESTEP_SHIFT = 1.0  # Timesteps(downscale_freq_shift=1) in CombinedTimestepLabelEmbeddings

# DiTTransformer2DModel's constructor defaults (a field missing from config.json takes these)
_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}  # fmt: skip
# fields that must hold one value (the one the DiT math has), with why; the legacy
# Transformer2DModel fields are ignored by diffusers when it loads such a config as a DiT, but a
# non-neutral one means a model that is not a DiT
_FIXED: dict[str, tuple[Any, str]] = {
    "norm_type": ("ada_norm_zero", "ditfast's DiT is the adaLN-Zero design"),
    "activation_fn": ("gelu-approximate", "ditfast's MLP uses GELU with the tanh approximation"),
    "norm_elementwise_affine": (False, "ditfast's adaLN LayerNorms have no affine parameters"),
    "dropout": (0.0, "ditfast's DiT has no dropout"),
    "cross_attention_dim": (None, "ditfast's DiT has no cross-attention to encoder states"),
    "num_vector_embeds": (None, "ditfast's DiT takes continuous latents"),
    "only_cross_attention": (False, "ditfast's DiT has self-attention"),
    "double_self_attention": (False, "ditfast's DiT has one attention per block"),
    "attention_type": ("default", "ditfast's DiT has plain attention"),
    "caption_channels": (None, "ditfast's DiT is class-conditional"),
    "use_additional_conditions": (None, "ditfast's DiT is class-conditional"),
}
# fields without effect on a DiT's outputs in fp32 (upcast_attention: attention runs in the input dtype)
_IGNORED = ("norm_num_groups", "upcast_attention", "use_linear_projection", "interpolation_scale")


class InexactExportWarning(UserWarning):
    """save_diffusers wrote a model whose numerics diffusers cannot reproduce (official timestep features)."""


def _folder_error(folder, problem: str) -> CheckpointError:
    return CheckpointError(folder, f"not a usable diffusers DiT: {problem}")


def is_diffusers_folder(path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a transformer folder) or a
    ``transformer/`` subfolder (a pipeline root): what :func:`ditfast.load_model` sends here."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) or os.path.isdir(os.path.join(path, "transformer"))


def transformer_folder(path: str | os.PathLike) -> str:
    """The transformer folder of ``path``: ``path/transformer`` for a pipeline root (a folder with
    ``model_index.json`` or a ``transformer/`` subfolder), else ``path`` itself."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _folder_error(path, "no such folder")
    sub = os.path.join(path, "transformer")
    if os.path.isdir(sub) and (os.path.isfile(os.path.join(path, "model_index.json")) or not os.path.isfile(os.path.join(path, CONFIG_NAME))):
        return sub
    return path


def pipeline_vae(path: str | os.PathLike) -> str | None:
    """The ``vae/`` folder of the diffusers pipeline that ``path`` belongs to (``path`` is the
    pipeline root, or its ``transformer/`` subfolder), or None when there is none."""
    if not is_diffusers_folder(path):
        return None
    path = os.path.abspath(os.fspath(path))
    roots = [path] if os.path.isdir(os.path.join(path, "transformer")) else []
    if os.path.isfile(os.path.join(os.path.dirname(path), "model_index.json")):
        roots.append(os.path.dirname(path))
    for root in roots:
        vae = os.path.join(root, "vae")
        if os.path.isfile(os.path.join(vae, CONFIG_NAME)):
            return vae
    return None


def _read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise _folder_error(folder, f"no {CONFIG_NAME} (expected a DiTTransformer2DModel folder, or a pipeline root with transformer/{CONFIG_NAME})")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise _folder_error(folder, f"{CONFIG_NAME} is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _folder_error(folder, f"{CONFIG_NAME} holds a {type(config).__name__}, expected a JSON object")
    return config


def _read_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index, binary = (os.path.join(folder, n) for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, BIN_NAME))
    try:
        if os.path.isfile(single):
            return load_file(single, device="cpu")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in shards:
                state.update(load_file(os.path.join(folder, name), device="cpu"))
            return state
        if os.path.isfile(binary):
            return torch.load(binary, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, foreign or unsafe file: say which and why
        raise _folder_error(folder, f"its weights cannot be read ({type(exc).__name__}: {exc})") from None
    present = sorted(os.listdir(folder))
    raise _folder_error(folder, f"no weights: expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {BIN_NAME}; the folder holds {present}")


def dit_config(config: Mapping[str, Any], where: str = CONFIG_NAME) -> dict[str, Any]:
    """DiT constructor arguments (numeric settings included) for a ``DiTTransformer2DModel``
    ``config.json``; a ValueError naming the field for anything ditfast cannot represent."""
    name = config.get("_class_name", "DiTTransformer2DModel")
    if name not in CLASS_NAMES:
        raise ValueError(f"{where}: _class_name is {name!r}; expected one of {list(CLASS_NAMES)}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS and k not in _FIXED and k not in _IGNORED)
    if unknown:
        raise ValueError(f"{where}: unknown config field(s) {unknown} (not DiTTransformer2DModel's); refusing to guess what they change")
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, (value, why) in _FIXED.items():
        if key in c and c[key] != value:
            raise ValueError(f"{where}: {key} must be {value!r} ({why}), got {c[key]!r}")
    for key in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size", "num_embeds_ada_norm"):
        if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {c[key]!r}")
    if not isinstance(c["attention_bias"], bool):
        raise ValueError(f"{where}: attention_bias must be true or false, got {c['attention_bias']!r}")
    eps = c["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"{where}: norm_eps must be a number in (0, 1), got {eps!r}")
    in_ch, out_ch = c["in_channels"], c["out_channels"]
    if out_ch not in (None, in_ch, 2 * in_ch):
        raise ValueError(f"{where}: out_channels must be in_channels ({in_ch}) or 2 * in_channels ({2 * in_ch}, learned sigma), got {out_ch!r}")
    if c["sample_size"] % c["patch_size"]:
        raise ValueError(f"{where}: sample_size {c['sample_size']} must be a multiple of patch_size {c['patch_size']}")
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    if hidden % 4:
        raise ValueError(f"{where}: num_attention_heads * attention_head_dim = {hidden} must be a multiple of 4 (2D sin-cos position table)")
    return dict(
        input_size=c["sample_size"], patch_size=c["patch_size"], in_channels=in_ch, hidden_size=hidden,
        depth=c["num_layers"], num_heads=c["num_attention_heads"], mlp_ratio=4.0, class_dropout_prob=0.1,
        num_classes=c["num_embeds_ada_norm"], learn_sigma=out_ch == 2 * in_ch,
        timestep_freq_shift=DIFFUSERS_TIMESTEP_SHIFT, mlp_norm_eps=float(eps),
    )  # fmt: skip


_EMBEDDERS = {  # diffusers (under transformer_blocks.i.norm1.emb.) -> ditfast
    "timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
}
_BLOCK = {  # diffusers (under transformer_blocks.i.) -> ditfast (under blocks.i.)
    "norm1.linear.weight": "adaLN_modulation.1.weight", "norm1.linear.bias": "adaLN_modulation.1.bias",
    "attn1.to_out.0.weight": "attn.proj.weight", "attn1.to_out.0.bias": "attn.proj.bias",
    "ff.net.0.proj.weight": "mlp.fc1.weight", "ff.net.0.proj.bias": "mlp.fc1.bias",
    "ff.net.2.weight": "mlp.fc2.weight", "ff.net.2.bias": "mlp.fc2.bias",
}  # fmt: skip
_TOP = {
    "pos_embed.proj.weight": "x_embedder.proj.weight", "pos_embed.proj.bias": "x_embedder.proj.bias",
    "proj_out_1.weight": "final_layer.adaLN_modulation.1.weight", "proj_out_1.bias": "final_layer.adaLN_modulation.1.bias",
    "proj_out_2.weight": "final_layer.linear.weight", "proj_out_2.bias": "final_layer.linear.bias",
}  # fmt: skip


def from_diffusers_state_dict(state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any], where: str = "state_dict") -> dict[str, torch.Tensor]:
    """A ``DiTTransformer2DModel`` state_dict -> the ditfast DiT state_dict (``kwargs`` from
    :func:`dit_config`). Refuses missing or unexpected keys, and per-block embedders that differ
    from block 0's (which ditfast's one shared embedder cannot reproduce)."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    depth, hidden = kwargs["depth"], kwargs["hidden_size"]

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise _folder_error(where, f"missing weight {key!r}")
        return state.pop(key)

    for src, dst in _TOP.items():
        out[dst] = take(src)
    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        for src, dst in _BLOCK.items():
            out[f"blocks.{i}.{dst}"] = take(pre + src)
        q, k, v = (take(f"{pre}attn1.to_{n}.weight") for n in "qkv")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v], dim=0)
        if f"{pre}attn1.to_q.bias" in state:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(f"{pre}attn1.to_{n}.bias") for n in "qkv"], dim=0)
        else:  # attention_bias false: the same function as zero biases
            out[f"blocks.{i}.attn.qkv.bias"] = q.new_zeros(3 * q.shape[0])
        for src, dst in _EMBEDDERS.items():
            tensor = take(f"{pre}norm1.emb.{src}")
            if i == 0:
                out[dst] = tensor
            elif tensor.shape != out[dst].shape or not torch.equal(tensor, out[dst]):
                raise _folder_error(where, (
                    f"{pre}norm1.emb.{src} differs from block 0's: this model has its own timestep/label "
                    "embedder in every block (trained natively in diffusers), while ditfast's DiT has one "
                    "embedder shared by all blocks; refused rather than loaded with different outputs"))  # fmt: skip
    if state:
        raise _folder_error(where, f"unexpected weights ({len(state)}): {sorted(state)[:8]}")
    grid = kwargs["input_size"] // kwargs["patch_size"]
    out["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(hidden, grid)).float().unsqueeze(0)
    return out


def _from_diffusers(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], where: str, device=None, **overrides) -> DiT:
    from ..checkpoint import check_state_dict

    kwargs = dit_config(config, where=f"{where}/{CONFIG_NAME}")
    weights = from_diffusers_state_dict(state, kwargs, where=where)
    with torch.device("meta"):
        net = DiT(**kwargs, **overrides)
    try:
        check_state_dict(net, weights)  # shapes (e.g. a label table or qkv not matching config.json)
    except ValueError as exc:
        detail = str(exc).replace("\n  ", " ")
        raise _folder_error(where, f"the weights do not match {CONFIG_NAME} (tensors named as in ditfast): {detail}") from None
    dtype = torch.get_default_dtype()
    net.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}, strict=True, assign=True)
    if device is not None:
        net = net.to(device)
    return net.eval()


def load_diffusers(path: str | os.PathLike, device: torch.device | str | None = None, **overrides: Any) -> DiT:
    """A ditfast DiT (eval mode) that reproduces the ``DiTTransformer2DModel`` in ``path``: a
    transformer folder or a pipeline root with ``transformer/``. ``overrides``: DiT keyword options
    that do not change the math (``backend``, ``attn_backend``). Called by :func:`ditfast.load_model`."""
    allowed = {"backend", "attn_backend"}
    if set(overrides) - allowed:
        raise ValueError(f"a diffusers folder fixes the architecture; only {sorted(allowed)} may be given, got {sorted(set(overrides) - allowed)}")
    folder = transformer_folder(path)
    config = _read_config(folder)
    dit_config(config, where=f"{folder}/{CONFIG_NAME}")  # refuse a bad config before reading weights
    return _from_diffusers(config, _read_weights(folder), folder, device=device, **overrides)


def to_diffusers(model: DiT) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json contents, state_dict) of the ``DiTTransformer2DModel`` equivalent to ``model``
    (see :func:`save_diffusers` for what it cannot carry)."""
    if not isinstance(model, DiT):
        raise TypeError(f"model must be a ditfast DiT, got {type(model).__name__}")
    if model.block != "adaLN-Zero":
        raise ValueError(f"model.block must be 'adaLN-Zero' (diffusers' DiT has no {model.block!r} design), got {model.block!r}")
    if model.class_dropout_prob <= 0:
        raise ValueError("model.class_dropout_prob must be > 0: diffusers' label table always has the null-class row, this model's has none")
    if not model.blocks:
        raise ValueError("model depth must be >= 1 (diffusers conditions its final layer through block 0), got 0")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hidden = model.pos_embed.shape[-1]
    if sd["blocks.0.mlp.fc1.weight"].shape[0] != 4 * hidden:
        raise ValueError(f"mlp_ratio must be 4 (diffusers' FeedForward), got {sd['blocks.0.mlp.fc1.weight'].shape[0] / hidden}")
    grid = model.input_size // model.patch_size
    table = torch.from_numpy(get_2d_sincos_pos_embed(hidden, grid)).unsqueeze(0)
    if not torch.allclose(sd["pos_embed"].double().cpu(), table, rtol=0, atol=1e-6):
        raise ValueError("pos_embed differs from the 2D sin-cos table that diffusers recomputes (it is not saved there)")
    config = _config(model)
    out: dict[str, torch.Tensor] = {src: sd[dst] for src, dst in _TOP.items()}
    for i in range(len(model.blocks)):
        pre = f"transformer_blocks.{i}."
        out.update({pre + src: sd[f"blocks.{i}.{dst}"] for src, dst in _BLOCK.items()})
        for name, w, b in zip("qkv", sd[f"blocks.{i}.attn.qkv.weight"].chunk(3), sd[f"blocks.{i}.attn.qkv.bias"].chunk(3)):
            out[f"{pre}attn1.to_{name}.weight"], out[f"{pre}attn1.to_{name}.bias"] = w, b
        out.update({f"{pre}norm1.emb.{src}": sd[dst] for src, dst in _EMBEDDERS.items()})  # one copy per block
    # separate, contiguous CPU storage per tensor (safetensors refuses shared or strided views)
    return config, {k: v.cpu().contiguous().clone() for k, v in out.items()}


def _config(model: DiT) -> dict[str, Any]:
    """The ``DiTTransformer2DModel`` config.json of ``model`` (an adaLN-Zero DiT)."""
    hidden = model.pos_embed.shape[-1]
    return {
        "_class_name": "DiTTransformer2DModel", "_diffusers_version": _diffusers_version(),
        "num_attention_heads": model.num_heads, "attention_head_dim": hidden // model.num_heads,
        "in_channels": model.in_channels, "out_channels": model.out_channels, "num_layers": len(model.blocks),
        "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": model.input_size,
        "patch_size": model.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": model.num_classes,
        "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
        "norm_eps": model.mlp_norm_eps,
    }  # fmt: skip


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers not installed: the version these folders were tested with
        return "0.42.1"


def save_diffusers(model: DiT, folder: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write ``model`` as a ``DiTTransformer2DModel`` folder (``config.json`` and
    ``diffusion_pytorch_model.safetensors``, each written under a temporary name and renamed) that
    ``DiTTransformer2DModel.from_pretrained(folder)`` loads with no missing or unexpected keys.
    Returns the folder. A non-empty folder is refused unless ``overwrite=True``.

    ``norm_eps`` is written from the model's ``mlp_norm_eps``, so the LayerNorms always match. A
    model with diffusers' numerics (``timestep_freq_shift=1``, as :func:`load_diffusers` makes it)
    is reproduced by diffusers exactly (measured on CPU fp32: bit-identical outputs).

    An official-math model (``timestep_freq_shift=0``, every ``ditfast.DiT()`` by default) cannot
    be represented exactly: diffusers hard-codes its timestep features' frequency shift (exponent
    divided by 127 instead of 128; at t = 999 the features differ by up to 1.98). It is exported
    with the standard key map anyway, and diffusers' outputs then differ, measured as max|a-b| /
    max|b| on random inputs (CPU, fp32): 2.3e-2 for the trained ``ditfast/assets/digits_dit``
    model, 0.27 to 0.45 for DiTs with random (untrained) weights. Convert with care: such an export
    is a different model in diffusers.
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"output folder {folder!r} is an existing file; expected a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise FileExistsError(f"output folder {folder!r} is not empty; pass overwrite=True to replace its config.json and weights")
    if os.path.exists(os.path.join(folder, WEIGHTS_INDEX_NAME)):  # diffusers reads sharded weights first
        raise FileExistsError(f"output folder {folder!r} holds {WEIGHTS_INDEX_NAME}, which diffusers would load instead of the new weights; remove it first")
    config, tensors = to_diffusers(model)
    if getattr(model.t_embedder, "freq_shift", 0) != 1:
        warnings.warn(
            "save_diffusers: this model uses the official timestep features (timestep_freq_shift=0), which "
            "diffusers cannot express (its frequency shift of 1 is hard-coded): diffusers will compute a "
            "different model from these weights (see the docstring for the measured difference)",
            InexactExportWarning, stacklevel=2,
        )  # fmt: skip
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def write_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(os.path.join(folder, CONFIG_NAME), write_config)
    return folder


# ----------------------------------------------------------------------------------------------
# A ditfast DiT inside diffusers' DiTPipeline
# ----------------------------------------------------------------------------------------------


class _Config(dict):
    """The model's diffusers config: item and attribute access, like diffusers' FrozenDict."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DiffusersTransformer(nn.Module):
    """A ditfast DiT with ``DiTTransformer2DModel``'s call signature and output type, and the
    attributes ``DiTPipeline`` reads (``config.sample_size``, ``config.in_channels``,
    ``config.out_channels``, ``dtype``, ``device``): ``pipe.transformer = diffusers_transformer(...)``.
    The pipeline keeps its own loop, CFG and scheduler; each step runs ditfast's forward.
    ``pipe.save_pretrained`` does not know this class and skips it: save the transformer with
    ``save_diffusers(pipe.transformer.model, root + "/transformer")``."""

    def __init__(self, model: DiT):
        super().__init__()
        if not isinstance(model, DiT):
            raise TypeError(f"model must be a ditfast DiT, got {type(model).__name__}")
        self.model = model
        self.config = _Config(_config(model))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.pos_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    def forward(self, hidden_states: torch.Tensor, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict: bool = True):
        """hidden_states (B, C, H, W), timestep (B,) or one value for all, class_labels (B,) ->
        ``Transformer2DModelOutput(sample=(B, C_out, H, W))`` (or a 1-tuple with ``return_dict=False``)."""
        if timestep is None or class_labels is None:
            raise ValueError("timestep and class_labels are required (a DiT is conditioned on both)")
        if cross_attention_kwargs:
            raise ValueError(f"cross_attention_kwargs are not supported by ditfast's attention, got {sorted(cross_attention_kwargs)}")
        batch = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=hidden_states.device)
        t = t.reshape(1).expand(batch) if t.dim() == 0 else t
        y = torch.as_tensor(class_labels, device=hidden_states.device).reshape(-1)
        out = self.model(hidden_states, t, y)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def diffusers_transformer(model: DiT | str | os.PathLike | nn.Module, device: torch.device | str | None = None) -> DiffusersTransformer:
    """A drop-in for ``DiTPipeline.transformer`` running ditfast's kernels:
    ``pipe.transformer = ditfast.diffusers_transformer(pipe.transformer)``.

    ``model``: a ditfast DiT (used as it is), a diffusers ``DiTTransformer2DModel`` (converted, on
    its device and in its dtype) or a folder (:func:`load_diffusers`). ``device``: where to put it.
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_diffusers(model)
    elif not isinstance(model, DiT) and hasattr(model, "config") and isinstance(model, nn.Module):
        param = next(model.parameters())
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        model = _from_diffusers(dict(model.config), state, type(model).__name__).to(device=param.device, dtype=param.dtype)
    elif not isinstance(model, DiT):
        raise TypeError(f"model must be a ditfast DiT, a diffusers DiTTransformer2DModel or a folder, got {type(model).__name__}")
    if device is not None:
        model = model.to(device)
    return DiffusersTransformer(model)
