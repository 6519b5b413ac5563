"""diffusers interoperability (ditfast.interop.diffusers): folders both ways and the DiTPipeline swap,
tested against the real diffusers (in the [test] extra) with tiny random models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

try:
    import diffusers  # noqa: F401
except ImportError:  # the [test] extra installs it; CI (which installs that extra) must not skip
    if os.environ.get("CI") or os.environ.get("DITFAST_EXPECT_EXT") == "1":
        raise
    pytest.skip("diffusers is not installed (it is in the [test] extra: pip install -e '.[test]')", allow_module_level=True)

from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file, save_file

import ditfast
from ditfast import DiT, load_model
from ditfast.errors import CheckpointError
from ditfast.interop.diffusers import DiffusersTransformer, load_diffusers, pipeline_vae
from conftest import assert_close, max_rel_error, randomize_

diffusers_logging.set_verbosity_error()  # "accelerate not found" notices on every from_pretrained

ASSET = os.path.join(os.path.dirname(ditfast.__file__), "assets", "digits_dit.safetensors")

# tiny DiTTransformer2DModel configs: patch 2 and 4, learned sigma on (out 2C) and off (out None or C),
# head dims 8, 9 (odd), 5 (odd), 12; qkv without bias; another norm_eps
CONFIGS = {
    "p2-sigma": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10),
    "p4-nosigma-odd9": dict(num_attention_heads=4, attention_head_dim=9, in_channels=4, out_channels=None, num_layers=2, sample_size=8, patch_size=4, num_embeds_ada_norm=7),
    "p2-c3-odd5": dict(num_attention_heads=4, attention_head_dim=5, in_channels=3, out_channels=6, num_layers=3, sample_size=4, patch_size=2, num_embeds_ada_norm=5),
    "p4-nobias-eps": dict(num_attention_heads=3, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=1, sample_size=8, patch_size=4, num_embeds_ada_norm=3, attention_bias=False, norm_eps=1e-6),
}  # fmt: skip


def _diffusers_model(config: dict, seed: int = 0, shared_embedders: bool = True) -> DiTTransformer2DModel:
    """A DiTTransformer2DModel with every weight random (non-zero); with ``shared_embedders`` each
    block's timestep/label embedder is a copy of block 0's (as in a converted official checkpoint)."""
    model = DiTTransformer2DModel(**config).eval()
    randomize_(model, seed=seed)
    if shared_embedders:
        with torch.no_grad():
            state = model.state_dict()
            for key in state:
                if ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):
                    state[key].copy_(state["transformer_blocks.0." + key.split(".", 2)[2]])
    return model


def _inputs(in_channels: int, size: int, num_classes: int, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, num_classes + 1, (batch,), generator=g)  # the null class num_classes included
    return x, t, y


@torch.no_grad()
def _compare(reference: DiTTransformer2DModel, net: DiT, what: str, batch: int = 3) -> None:
    cfg = reference.config
    x, t, y = _inputs(cfg.in_channels, cfg.sample_size, cfg.num_embeds_ada_norm, batch)
    expected = reference(x, t, y).sample
    got = net(x, t, y)
    assert expected.abs().max() > 0.1, f"{what}: degenerate test, diffusers' output is ~zero"
    assert max_rel_error(got, expected) <= 1e-5, f"{what}: max rel error {max_rel_error(got, expected):.3e}"
    assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), what=what)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_diffusers_folder_reproduces_diffusers(tmp_path, name):
    config = CONFIGS[name]
    reference = _diffusers_model(config)
    reference.save_pretrained(tmp_path)
    net = load_model(tmp_path)
    assert isinstance(net, DiT) and not net.training
    assert net.timestep_freq_shift == 1.0 and net.mlp_norm_eps == config.get("norm_eps", 1e-5)
    assert net.learn_sigma == (config["out_channels"] == 2 * config["in_channels"])
    _compare(reference, net, name)


def test_the_numeric_settings_are_needed(tmp_path):
    """The same weights with the official math (shift 0) do not reproduce diffusers: the settings matter."""
    reference = _diffusers_model(CONFIGS["p2-sigma"])
    reference.save_pretrained(tmp_path)
    net = load_model(tmp_path)
    official = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=10).eval()
    official.load_state_dict(net.state_dict())
    x, t, y = _inputs(4, 8, 10)
    with torch.no_grad():
        assert max_rel_error(official(x, t, y), reference(x, t, y).sample) > 1e-2


def test_default_dit_is_the_official_math():
    """The new settings leave a default DiT as it was: no new state_dict keys, official timestep features."""
    kwargs = dict(input_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=10)
    default, shifted = DiT(**kwargs), DiT(**kwargs, timestep_freq_shift=1.0, mlp_norm_eps=1e-5)
    assert list(default.state_dict()) == list(shifted.state_dict())
    assert default.timestep_freq_shift == 0.0 and default.mlp_norm_eps == 1e-6
    assert all(b.norm2.eps == 1e-6 for b in default.blocks) and all(b.norm2.eps == 1e-5 for b in shifted.blocks)
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    freqs = torch.exp(-np.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    official = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    assert torch.equal(ditfast.ops.timestep_embedding_ref(t, 256), official)
    with pytest.raises(ValueError, match="timestep_freq_shift"):
        DiT(**kwargs, timestep_freq_shift=128.0)
    with pytest.raises(ValueError, match="mlp_norm_eps"):
        DiT(**kwargs, mlp_norm_eps=0.0)


def test_numeric_settings_survive_a_safetensors_export(tmp_path):
    """The settings are constructor arguments, so a file's ditfast_config metadata carries them."""
    from ditfast.train import export_safetensors

    reference = _diffusers_model(CONFIGS["p2-sigma"])
    reference.save_pretrained(tmp_path / "m")
    net = load_model(tmp_path / "m")
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=10,
                  learn_sigma=True, timestep_freq_shift=net.timestep_freq_shift, mlp_norm_eps=net.mlp_norm_eps)  # fmt: skip
    export_safetensors(net, config, str(tmp_path / "net.safetensors"))
    again = load_model(tmp_path / "net.safetensors")
    assert (again.timestep_freq_shift, again.mlp_norm_eps) == (1.0, 1e-5)
    _compare(reference, again, "ditfast safetensors with the settings in its metadata")


def test_pipeline_root_bin_and_sharded_weights(tmp_path):
    reference = _diffusers_model(CONFIGS["p2-sigma"], seed=1)
    pipe = DiTPipeline(transformer=reference, vae=_tiny_vae(), scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    _compare(reference, load_model(tmp_path / "pipe"), "pipeline root")
    _compare(reference, load_model(tmp_path / "pipe" / "transformer"), "transformer/ of a pipeline root")
    assert pipeline_vae(tmp_path / "pipe") == os.path.abspath(tmp_path / "pipe" / "vae")
    assert pipeline_vae(tmp_path / "pipe" / "transformer") == os.path.abspath(tmp_path / "pipe" / "vae")
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    _compare(reference, load_model(tmp_path / "bin"), ".bin weights")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json")
    _compare(reference, load_model(tmp_path / "sharded"), "sharded weights")
    assert pipeline_vae(tmp_path / "bin") is None


@pytest.mark.parametrize("name", ["p2-sigma", "p2-c3-odd5"])
def test_save_diffusers_round_trip_with_diffusers_numerics(tmp_path, name):
    """diffusers -> ditfast -> (changed) -> diffusers: loads with no missing/unexpected keys, same outputs."""
    _diffusers_model(CONFIGS[name]).save_pretrained(tmp_path / "in")
    net = load_model(tmp_path / "in")
    randomize_(net, seed=7)  # a changed model (e.g. fine-tuned with ditfast)
    assert ditfast.save_diffusers(net, tmp_path / "out") == os.fspath(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "diffusion_pytorch_model.safetensors"]  # no temporaries left
    exported, info = DiTTransformer2DModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    _compare(exported.eval(), net, f"{name} exported")
    back = load_model(tmp_path / "out")  # and back again: the same weights
    assert {k: v for k, v in back.state_dict().items()}.keys() == net.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())


def test_official_model_round_trip_and_export_difference(tmp_path):
    """official -> diffusers -> ditfast: the weights survive exactly; diffusers' outputs differ from the
    official model's by the timestep frequency shift (the figure in save_diffusers' docstring and the README)."""
    net = load_model(ASSET)  # a trained official-math DiT (digits, patch 4, learned sigma)
    assert net.timestep_freq_shift == 0.0
    with pytest.warns(ditfast.interop.diffusers.InexactExportWarning, match="cannot express"):
        ditfast.save_diffusers(net, tmp_path)
    exported = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    back = load_model(tmp_path)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    _compare(exported, back, "official -> diffusers -> ditfast")  # ditfast reproduces the export
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 1000, (16,), generator=g), torch.randint(0, 10, (16,), generator=g)
    with torch.no_grad():
        err = max_rel_error(exported(x, t, y).sample, net(x, t, y))
    assert 1e-2 < err < 3e-2, f"official -> diffusers export differs by {err:.3e} (documented: 2.3e-2)"


def test_save_diffusers_refusals(tmp_path):
    net = DiT(input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=10)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        ditfast.save_diffusers(net, tmp_path / "full")
    ditfast.save_diffusers(net, tmp_path / "full", overwrite=True)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"  # nothing else is touched
    ditfast.save_diffusers(net, tmp_path / "full", overwrite=True)  # overwrite an export
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        ditfast.save_diffusers(net, tmp_path / "file")
    with pytest.raises(ValueError, match="block must be 'adaLN-Zero'"):
        ditfast.save_diffusers(DiT(input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, block="adaLN"), tmp_path / "a")
    with pytest.raises(ValueError, match="class_dropout_prob"):
        ditfast.save_diffusers(DiT(input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, class_dropout_prob=0.0), tmp_path / "b")
    with pytest.raises(ValueError, match="mlp_ratio must be 4"):
        ditfast.save_diffusers(DiT(input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, mlp_ratio=2.0), tmp_path / "c")
    with pytest.raises(TypeError, match="ditfast DiT"):
        ditfast.save_diffusers(torch.nn.Linear(2, 2), tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing


# ---------------------------------------------------------------------------------------------
# bad folders


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def good_folder(tmp_path):
    _diffusers_model(CONFIGS["p2-sigma"]).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("field, value, message", [
    ("norm_type", "ada_norm", "norm_type must be 'ada_norm_zero'"),
    ("activation_fn", "gelu", "activation_fn must be 'gelu-approximate'"),
    ("norm_elementwise_affine", True, "norm_elementwise_affine must be False"),
    ("dropout", 0.1, "dropout must be 0.0"),
    ("cross_attention_dim", 32, "cross_attention_dim must be None"),
    ("out_channels", 5, "out_channels must be in_channels"),
    ("num_layers", 0, "num_layers must be a positive integer"),
    ("norm_eps", "small", "norm_eps must be a number"),
    ("rope_theta", 10000, r"unknown config field\(s\) \['rope_theta'\]"),
    ("_class_name", "UNet2DModel", "_class_name is 'UNet2DModel'"),
])  # fmt: skip
def test_unrepresentable_configs_are_refused_naming_the_field(good_folder, field, value, message):
    _edit_config(good_folder, **{field: value})
    with pytest.raises(ValueError, match=message):
        load_model(good_folder)


def test_bad_folders_are_refused(good_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(empty)
    weights = good_folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    os.remove(good_folder / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(good_folder)
    DiTTransformer2DModel(**CONFIGS["p2-sigma"]).save_config(good_folder)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="no weights: expected diffusion_pytorch_model.safetensors"):
        load_model(good_folder)
    save_file({k: v for k, v in state.items() if k != "transformer_blocks.1.attn1.to_k.weight"}, weights)
    with pytest.raises(CheckpointError, match="missing weight 'transformer_blocks.1.attn1.to_k.weight'"):
        load_model(good_folder)
    save_file({**state, "extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(CheckpointError, match=r"unexpected weights \(1\): \['extra.weight'\]"):
        load_model(good_folder)
    save_file({**state, "proj_out_2.weight": torch.zeros(3, 16)}, weights)  # wrong shape for config.json
    with pytest.raises(CheckpointError, match="do not match config.json.*final_layer.linear.weight"):
        load_model(good_folder)
    weights.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="weights cannot be read"):
        load_model(good_folder)
    save_file(state, weights)
    with pytest.raises(ValueError, match="model must be None for a diffusers folder"):
        load_model(good_folder, model="DiT-S/2")
    with pytest.raises(ValueError, match=r"only \['attn_backend', 'backend'\] may be given, got \['input_size'\]"):
        load_model(good_folder, input_size=16)
    assert load_model(good_folder, backend="eager").backend == "eager"


def test_differing_per_block_embedders_are_refused(tmp_path):
    """A natively trained diffusers DiT (one embedder per block) is refused, never loaded with other outputs."""
    _diffusers_model(CONFIGS["p2-sigma"], shared_embedders=False).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder\.linear_1\.weight differs from block 0's.*refused"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# inside diffusers' DiTPipeline


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(5)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8).eval()  # fmt: skip


def _images(pipe, guidance: float) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=[1, 7, 999], guidance_scale=guidance, num_inference_steps=3,
                generator=torch.Generator().manual_seed(3), output_type="pt").images  # fmt: skip


@pytest.mark.parametrize("scheduler, guidance, out_channels", [(DDIMScheduler, 3.0, 8), (DPMSolverMultistepScheduler, 3.0, 8), (DDIMScheduler, 1.0, 4)])
def test_pipeline_swap_gives_the_same_images(scheduler, guidance, out_channels):
    # DiTPipeline's null class is hard-coded as 1000: a 1000-class model
    config = {**CONFIGS["p2-sigma"], "num_embeds_ada_norm": 1000, "out_channels": out_channels}
    reference = _diffusers_model(config, seed=2)
    pipe = DiTPipeline(transformer=reference, vae=_tiny_vae(), scheduler=scheduler())
    expected = _images(pipe, guidance)
    pipe.transformer = ditfast.diffusers_transformer(pipe.transformer)  # the one-line swap
    assert isinstance(pipe.transformer, DiffusersTransformer)
    got = _images(pipe, guidance)
    assert expected.std() > 0.01, "degenerate test: flat images"
    assert_close(got, expected, what=f"{scheduler.__name__} images, cfg {guidance}")


def test_diffusers_transformer_call_signature(good_folder):
    reference = DiTTransformer2DModel.from_pretrained(good_folder).eval()
    wrapped = ditfast.diffusers_transformer(good_folder)
    for attr in ("in_channels", "out_channels", "sample_size", "patch_size", "num_layers", "norm_eps"):
        assert wrapped.config[attr] == getattr(reference.config, attr) == getattr(wrapped.config, attr), attr
    assert wrapped.dtype == torch.float32 and wrapped.device == torch.device("cpu")
    x, t, y = _inputs(4, 8, 10)
    with torch.no_grad():
        out = wrapped(x, timestep=t, class_labels=y)
        assert isinstance(out, Transformer2DModelOutput)
        assert_close(out.sample, reference(x, timestep=t, class_labels=y).sample, what="wrapped")
        (tup,) = wrapped(x, t, y, return_dict=False)
        assert torch.equal(tup, out.sample)
        one_t = wrapped(x, timestep=t[0], class_labels=y).sample  # one timestep for all
        assert_close(one_t, reference(x, t[:1].expand(3), y).sample, what="scalar timestep")
    net = load_model(good_folder)
    assert ditfast.diffusers_transformer(net).model is net  # a ditfast DiT is wrapped as it is
    with pytest.raises(TypeError, match="DiTTransformer2DModel or a folder"):
        ditfast.diffusers_transformer(42)
    with pytest.raises(ValueError, match="timestep and class_labels are required"):
        wrapped(x)


# ---------------------------------------------------------------------------------------------
# ditfast sample --ckpt FOLDER


def test_sample_cli_on_a_pipeline_folder(tmp_path, capsys):
    from ditfast.sample_cli import main

    reference = _diffusers_model({**CONFIGS["p2-sigma"], "num_embeds_ada_norm": 1000}, seed=3)
    DiTPipeline(transformer=reference, vae=_tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    common = ["--num-samples", "2", "--steps", "2", "--sampler", "ddim", "--labels", "3,4", "--no-png", "--no-progress", "--device", "cpu"]
    for ckpt, out in ((tmp_path / "pipe", "a"), (tmp_path / "pipe" / "transformer", "b")):
        assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / out), *common]) == 0
        samples = np.load(tmp_path / out / "samples.npz")["arr_0"]
        assert samples.dtype == np.uint8 and samples.shape == (2, 8, 8, 3)  # decoded by the pipeline's vae/
    assert "VAE" in capsys.readouterr().out
    a, b = (np.load(tmp_path / o / "samples.npz")["arr_0"] for o in "ab")
    assert np.array_equal(a, b)
