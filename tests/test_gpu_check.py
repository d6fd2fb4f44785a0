"""benchmarks/gpu_check.py, the device check, in the parts that need no GPU: the builds it plans, how it reads
TensorRT's layer list, its report, and its refusal to run (exit 2, one line) where TensorRT or a GPU is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_plan_builds_every_form_with_two_profiles_and_onnx_attention_only_where_parsed():
    old = {b["name"] for b in gpu_check.build_plan("10.3.0")}
    new = {b["name"] for b in gpu_check.build_plan("11.4.0")}
    assert old == {"fp16", "int8", "fp32", "fp32-tf32"} and new == old | {"fp16-onnx-attention"}
    for build in gpu_check.build_plan("10.14.1"):
        assert build["options"].count("--min-shapes") == 2 and build["options"].count("--max-shapes") == 2
    assert "--tf32" in next(b for b in gpu_check.build_plan("10.3.0") if b["name"] == "fp32-tf32")["options"]


@pytest.mark.parametrize("layers, fused", [
    (["conv1", "{ForeignNode[/attention/MatMul...]} _gemm_mha_v2", "head"], True),
    ([{"Name": "q_proj", "LayerType": "Convolution"}, {"Name": "sm", "LayerType": "SoftMax"}], False),
    ([{"Name": "attn", "LayerType": "Attention", "TacticName": "fmha_v2_flash"}], True),
])
def test_layer_lists_say_whether_attention_fused(layers, fused):
    found = gpu_check.attention_layers({"Layers": layers})
    assert found["fused"] is fused and found["layers"] == len(layers) and found["attention_layers"]


def test_the_report_is_json_and_markdown_of_every_section():
    report = {"format": gpu_check.REPORT_FORMAT,
              "environment": {"date": "2026-12-05", "tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": [8, 7],
                              "polygraphy": "0.53.6", "onnxruntime": "1.32.0"},
              "builds": [{"name": "fp16", "engine": "fp16.engine", "seconds": 41.0, "error": None}],
              "trtexec": [{"name": "fp16", "returncode": 0}], "capability": [{"onnx": "model.fp16.onnx", "returncode": 0}],
              "fusion": [{"name": "fp16", "fused": True, "attention_layers": ["_gemm_mha_v2"], "layers": 9}],
              "accuracy": [{"name": "fp16", "runner": "CUDA graph", "shapes": "x1:1x3x32x32", "rel_l2": 4.2e-4}],
              "tf32": {"rel_l2_between": 1e-4}}
    text = gpu_check.markdown(report)
    assert "| fp16 | yes | _gemm_mha_v2 |" in text and "| fp16 | CUDA graph | x1:1x3x32x32 | 0.00042 |" in text
    assert "TensorRT 10.3.0, GPU Orin (compute capability [8, 7])" in text and "TF32 on vs off" in text


def test_without_tensorrt_it_says_so_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "g")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "g").exists()
    assert done.stderr.strip().startswith("error: the device check needs TensorRT and an NVIDIA GPU (TensorRT: not installed")
