"""Loading official, training and safetensors checkpoints into ditfast.DiT."""

from __future__ import annotations

import pytest
import torch

from ditfast import DiT, load_model
from ditfast.checkpoint import infer_config
from conftest import randomize_

CFG = dict(input_size=8, patch_size=2, hidden_size=128, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def source():
    return randomize_(DiT(**CFG)).eval()


def _same_outputs(a: DiT, b: DiT):
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))


def test_official_bare_state_dict_file(tmp_path, source):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(source.state_dict(), path)
    model = load_model(path)
    assert not model.training and not model.pos_embed.requires_grad
    assert model.pos_embed.dtype == torch.float32 and model.pos_embed.device.type == "cpu"
    _same_outputs(model, source)
    # the usual official-script pattern works too: build, then load_state_dict(strict=True)
    fresh = DiT(**CFG)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    _same_outputs(fresh.eval(), source)


def test_training_checkpoint_takes_ema(tmp_path, source):
    other = randomize_(DiT(**CFG), seed=7)
    ckpt = {"model": other.state_dict(), "ema": source.state_dict(), "opt": {"state": {}, "param_groups": []}, "args": {"lr": 1e-4}}
    path = tmp_path / "0100000.pt"
    torch.save(ckpt, path)
    _same_outputs(load_model(path), source)
    _same_outputs(load_model({"model": other.state_dict()}), other.eval())


def test_safetensors_and_prefixes_and_dtype(tmp_path, source):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    _same_outputs(load_model(path), source)
    half = {f"module.{k}": v.half() for k, v in source.state_dict().items()}
    model = load_model(half)
    assert model.x_embedder.proj.weight.dtype == torch.float32


def test_weights_only_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"pos_embed": torch.zeros(1), "obj": _Unsafe()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_model(path)


class _Unsafe:
    pass


def test_infer_config_of_official_shapes():
    with torch.device("meta"):
        xl = DiT()  # DiT-XL/2, 256px defaults
    cfg = infer_config(xl.state_dict())
    assert cfg == dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                       class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, mlp_ratio=4.0,
                       block="adaLN-Zero")  # fmt: skip
    with torch.device("meta"):
        b4 = DiT(input_size=64, patch_size=4, hidden_size=768, depth=12, num_heads=12, learn_sigma=False)
    cfg = infer_config(b4.state_dict())
    assert (cfg["input_size"], cfg["patch_size"], cfg["depth"], cfg["num_heads"], cfg["learn_sigma"]) == (64, 4, 12, 12, False)


def test_named_model_and_existing_model(source):
    sd = source.state_dict()
    with pytest.raises(ValueError, match="missing keys") as err:
        load_model(sd, model="DiT-S/2")  # S/2 has 12 blocks and width 384: many conflicts
    assert "shape conflicts" in str(err.value) and "x_embedder.proj.weight" in str(err.value)
    target = DiT(**CFG)
    assert load_model(sd, model=target) is target
    _same_outputs(target, source)


def test_mismatch_error_names_keys_and_shapes(source):
    sd = dict(source.state_dict())
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_model(sd, model=DiT(**{**CFG, "num_classes": 20}))
    msg = str(err.value)
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "y_embedder.embedding_table.weight: checkpoint (11, 128) vs model (21, 128)" in msg


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="neither a state_dict"):
        load_model({"step": 3})


def test_exported_safetensors_carry_their_config(tmp_path):
    from ditfast.train import export_safetensors

    cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=96, depth=1, num_heads=3, num_classes=5)
    model = randomize_(DiT(**cfg)).eval()  # 96 is no registry width: heads could not be inferred
    export_safetensors(model, cfg, str(tmp_path / "m.safetensors"))
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.num_heads == 3
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 900]), torch.tensor([2, 5])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_num_heads_override_for_a_non_registry_width():
    model = randomize_(DiT(input_size=8, patch_size=2, hidden_size=96, depth=1, num_heads=3, num_classes=5)).eval()
    with pytest.raises(ValueError, match="pass num_heads explicitly"):
        load_model(model.state_dict())
    assert load_model(model.state_dict(), num_heads=3).num_heads == 3
