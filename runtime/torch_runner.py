"""PyTorch backend: the reference every artifact is compared with."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from xattn.registry import LoadedModel, ModelIO, load_model
from runtime.base import Runner, TensorMeta
from xattn.errors import BadInputError, MissingDependencyError


class TorchRunner(Runner):
    """Runs a PyTorch model (built-in or ``package.module:factory``) in eval mode, without autograd.

    Args:
        model: a :class:`~xattn.registry.LoadedModel`, or a model name to load with ``checkpoint``
            and ``model_args``.
        device: ``"cpu"`` (default), ``"cuda"``, or ``"auto"`` (CUDA when present).
        dtype: ``"fp32"`` (default), ``"fp16"`` (CUDA only: an FP16 PyTorch reference), or ``"fp16-fused"``:
            an emulation, on any device, of an FP16 network whose attention runs in TensorRT's fused kernel:
            weights and every tensor entering or leaving a layer with weights are rounded to FP16, while the
            attention matmuls and softmax between them compute in FP32 (the fused kernel takes FP16 Q/K/V
            and accumulates and normalises in FP32). The figure a TensorRT FP16 engine should reproduce.
    """

    backend = "torch"

    def __init__(self, model: LoadedModel | str = "cross-attention-net", checkpoint: str | None = None,
                 model_args: Mapping[str, Any] | None = None, *, device: str = "cpu", dtype: str = "fp32",
                 io: ModelIO | None = None, name: str | None = None, allow_nonfinite: bool = False):
        loaded = model if isinstance(model, LoadedModel) else None
        super().__init__(name or f"torch:{loaded.name if loaded else model}", allow_nonfinite=allow_nonfinite)
        self._spec = (model, checkpoint, dict(model_args or {}), io)
        self.model = loaded
        self.device_request, self.dtype_name = device, dtype
        self.device: torch.device | None = None

    def activate_impl(self) -> None:
        if self.model is None:
            name, checkpoint, args, io = self._spec
            self.model = load_model(name, checkpoint, args, io=io)
        want = self.device_request
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise MissingDependencyError("a CUDA device was asked for but torch sees none",
                                         hint="use device='cpu', or install a CUDA build of torch")
        if self.dtype_name not in ("fp32", "fp16", "fp16-fused"):
            raise BadInputError(f"unknown torch dtype {self.dtype_name!r}", hint="use fp32, fp16 or fp16-fused")
        if self.dtype_name == "fp16" and not want.startswith("cuda"):
            raise BadInputError("an fp16 PyTorch reference needs a CUDA device")
        self.device = torch.device(want)
        if self.dtype_name == "fp16-fused":
            self.model = _fp16_fused_emulation(self.model)
        self.model.module.to(self.device, torch.float16 if self.dtype_name == "fp16" else torch.float32)

    def deactivate_impl(self) -> None:
        if self.model is not None and self.device is not None and self.device.type != "cpu":
            self.model.module.to("cpu", torch.float32)
            torch.cuda.empty_cache()

    def input_metadata_impl(self) -> dict[str, TensorMeta]:
        return {name: TensorMeta(name, np.dtype(np.float32), ("batch", channels, f"{name}_height", f"{name}_width"))
                for name, channels in self.model.io.inputs.items()}

    def output_names_impl(self) -> list[str]:
        return list(self.model.io.outputs)

    @torch.inference_mode()
    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtype = torch.float16 if self.dtype_name == "fp16" else torch.float32
        args = [torch.from_numpy(np.ascontiguousarray(feed[name])).to(self.device, dtype) for name in self.model.io.inputs]
        if self.device.type == "cuda":
            # Device-side time of the forward alone (host copies excluded), as benchmarks report on a GPU.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = self.model.module(*args)
            end.record()
            torch.cuda.synchronize()
            self.last_device_time = start.elapsed_time(end) / 1000.0
        else:
            result = self.model.module(*args)
        values = result if isinstance(result, (tuple, list)) else (result,)
        names = self.model.io.outputs
        if len(values) != len(names):
            raise BadInputError(f"model {self.model.name!r} returned {len(values)} outputs but declares {len(names)}")
        return {n: v.detach().float().cpu().numpy() for n, v in zip(names, values)}

    def describe(self) -> dict:
        record = self.model.record() if self.model else {}
        return {**super().describe(), "device": str(self.device or self.device_request), "dtype": self.dtype_name,
                **record}


def _to_fp16_precision(tensor):
    return tensor.to(torch.float16).to(tensor.dtype) if torch.is_tensor(tensor) and tensor.is_floating_point() else tensor


def _fp16_fused_emulation(model: LoadedModel) -> LoadedModel:
    """A copy of ``model`` whose weights, and the tensors entering and leaving each layer with weights, are
    rounded to FP16; functional ops between layers (attention's matmuls and softmax) stay FP32."""
    import copy
    import dataclasses

    module = copy.deepcopy(model.module)   # the caller's model (perhaps a shared reference) stays FP32
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(_to_fp16_precision(parameter))
    for layer in module.modules():
        if any(True for _ in layer.parameters(recurse=False)):
            layer.register_forward_pre_hook(lambda _m, args: tuple(_to_fp16_precision(a) for a in args))
            layer.register_forward_hook(lambda _m, _args, out: _to_fp16_precision(out))
    return dataclasses.replace(model, module=module)
