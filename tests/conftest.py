"""Shared fixtures. Tests build tiny models in code and download nothing."""

from __future__ import annotations

import os

import pytest
import torch

# Two xdist workers on two cores: one thread each avoids oversubscription (and noisy timings).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Commands invoked in-process print no progress lines (tests read their output); subprocess tests that
# need progress drop this from the environment they pass.
os.environ["XATTN_QUIET"] = "1"


@pytest.fixture(scope="session")
def small_attention_args():
    """A small cross-attention block with different query and key/value widths and two heads."""
    return {"in_channels": 8, "out_channels": 16, "num_heads": 2, "kv_channels": 6}


@pytest.fixture(scope="session")
def exported_small(tmp_path_factory, small_attention_args):
    """One verified export of the small block, shared by tests that only read it."""
    from exporter.onnx_export import export_onnx
    from exporter.registry import load_model

    path = tmp_path_factory.mktemp("export") / "small.onnx"
    model = load_model("cross-attention", model_args=small_attention_args)
    result = export_onnx(model, path)
    return model, result


@pytest.fixture(scope="session")
def exported_net(tmp_path_factory):
    """The default model exported once with default settings."""
    from exporter.onnx_export import export_onnx
    from exporter.registry import load_model

    path = tmp_path_factory.mktemp("net") / "model.onnx"
    model = load_model()
    return model, export_onnx(model, path)
