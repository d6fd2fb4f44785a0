"""Checkpoints: safe loading, sizes read from weights, clear errors for bad ones."""

import pytest
import torch
from safetensors.torch import save_file

from xattn.models import SeedCrossAttention
from xattn.registry import load_model
from xattn.errors import CheckpointError


class _Payload:
    """Any non-tensor object pickled into a checkpoint: weights-only loading must refuse it."""


def test_seed_checkpoint_of_any_width_loads_without_args(tmp_path):
    torch.manual_seed(0)
    original = SeedCrossAttention(24, 24)
    path = tmp_path / "seed.pth"
    torch.save(original.state_dict(), path)
    model = load_model("seed-cross-attention", path)
    assert model.model_args == {"in_channels": 24, "out_channels": 24}
    assert model.checkpoint_sha256 and model.init_seed is None
    x = torch.randn(1, 24, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x, x), original(x, x))


def test_safetensors_and_wrapped_state_dicts(tmp_path):
    net = load_model("cross-attention-net", model_args={"stem_channels": 8, "attn_channels": 16, "out_channels": 4})
    state = {k: v.contiguous() for k, v in net.module.state_dict().items()}
    save_file(state, str(tmp_path / "net.safetensors"))
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("net.safetensors", "wrapped.pt"):
        loaded = load_model("cross-attention-net", tmp_path / name)
        assert loaded.model_args == {"in_channels": 3, "stem_channels": 8, "attn_channels": 16, "out_channels": 4}
        for key, value in state.items():
            assert torch.equal(loaded.module.state_dict()[key], value)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="holds pickled Python objects.*refusing"):
        load_model("cross-attention", path)


def test_corrupt_and_missing(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        load_model("cross-attention", path)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model("cross-attention", bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("cross-attention", tmp_path / "nope.pt")


def test_wrong_keys_are_listed_with_a_prefix_hint(tmp_path):
    state = SeedCrossAttention(8, 8).state_dict()
    path = tmp_path / "wrapped.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    with pytest.raises(CheckpointError, match=r"missing keys conv_key.bias.*unexpected keys module\.conv_key\.bias"
                                              r".*saved from a wrapper"):
        load_model("seed-cross-attention", path, {"in_channels": 8, "out_channels": 8})
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in state.items() if k != "conv_value.bias"}, partial)
    with pytest.raises(CheckpointError, match=r"missing keys conv_value\.bias"):
        load_model("seed-cross-attention", partial)


def test_size_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "seed.pt"
    torch.save(SeedCrossAttention(8, 8).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatch conv_query.weight \(8, 8, 1, 1\) != \(16, 8, 1, 1\)"):
        load_model("seed-cross-attention", path, {"out_channels": 16})
