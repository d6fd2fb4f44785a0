"""Users' own model factories, referenced as ``tests.user_models:NAME`` in tests."""

import torch
from torch import nn

from xattn.models import CrossAttention


def declared():
    return CrossAttention(4, 8)


declared.xattn_io = {"inputs": {"x1": 4, "x2": 4}, "outputs": ["y"]}


def undeclared():
    return CrossAttention(4, 8)


def not_a_module():
    return 42


class BakedShape(nn.Module):
    """Bakes x1's spatial size into a reshape (int() on a traced size): the classic export defect."""

    xattn_io = {"inputs": {"x1": 4, "x2": 4}, "outputs": ["y"]}

    def __init__(self):
        super().__init__()
        self.attn = CrossAttention(4, 4)

    def forward(self, x1, x2):
        y = self.attn(x1, x2)
        b, c, h, w = y.shape
        return y.reshape(int(b), int(c), int(h) * int(w)).reshape(int(b), int(c), int(h), int(w))


def baked():
    return BakedShape()


baked.xattn_io = BakedShape.xattn_io


class Unexportable(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it."""

    xattn_io = {"inputs": {"x1": 4, "x2": 4}, "outputs": ["y"]}

    def forward(self, x1, x2):
        if x1.sum() > 0:
            return x1 * 2
        return x1 - x2.mean()


def unexportable():
    return Unexportable()


class WithBuffer(nn.Module):
    """Cross attention plus a registered buffer (a fixed per-channel gain): 120 weights, 8 buffer values."""

    xattn_io = {"inputs": {"x1": 4, "x2": 4}, "outputs": ["y"]}

    def __init__(self):
        super().__init__()
        self.attn = CrossAttention(4, 8)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 8).reshape(1, 8, 1, 1))

    def forward(self, x1, x2):
        return self.attn(x1, x2) * self.gain


def with_buffer():
    return WithBuffer()


class GuardedBranch(nn.Module):
    """kornia LoFTR's LinearAttention pattern: a branch on a size (here x2's position count > 256)."""

    xattn_io = {"inputs": {"x1": 4, "x2": 4}, "outputs": ["y"]}

    def __init__(self):
        super().__init__()
        self.attn = CrossAttention(4, 4)

    def forward(self, x1, x2):
        y = self.attn(x1, x2)
        if x2.shape[2] * x2.shape[3] > 256:
            return y * 2.0
        return y


def guarded():
    return GuardedBranch()


class LearnedPositions(nn.Module):
    """A learned positional embedding of fixed length (32x32 = 1024 positions of x1): x1's size is fixed
    in truth, and only a fixed-size export can succeed."""

    xattn_io = {"inputs": {"x1": 4, "x2": 4}, "outputs": ["y"]}

    def __init__(self):
        super().__init__()
        self.attn = CrossAttention(4, 4)
        self.positions = nn.Parameter(torch.zeros(1, 4, 1024))

    def forward(self, x1, x2):
        b, c, h, w = x1.shape
        x1 = (x1.flatten(2) + self.positions).reshape(b, c, h, w)
        return self.attn(x1, x2)


def learned_positions():
    return LearnedPositions()


class OnX2Grid(nn.Module):
    """Two outputs: one on x1's grid, one on x2's (LoFTR's second output lies on x2's grid)."""

    xattn_io = {"inputs": {"x1": 4, "x2": 4}, "outputs": ["y1", "y2"]}

    def __init__(self):
        super().__init__()
        self.forward_attn = CrossAttention(4, 4)
        self.backward_attn = CrossAttention(4, 4)

    def forward(self, x1, x2):
        return self.forward_attn(x1, x2), self.backward_attn(x2, x1)


def on_x2_grid():
    return OnX2Grid()


class TracedConstant(nn.Module):
    """Correct at every size, but the TorchScript tracer warns: a tensor turned into a Python float."""

    xattn_io = {"inputs": {"x1": 4, "x2": 4}, "outputs": ["y"]}

    def __init__(self):
        super().__init__()
        self.attn = CrossAttention(4, 4)
        self.register_buffer("gain", torch.tensor([0.5, 0.25]))

    def forward(self, x1, x2):
        return self.attn(x1, x2) * float(self.gain.sum())


def traced_constant():
    return TracedConstant()


class LinearCross(nn.Module):
    """Cross attention with nn.Linear projections over flattened maps (the transformer way), between conv
    stems: Linear layers export as MatMul with a weight (or Gemm), beside the two attention MatMuls."""

    xattn_io = {"inputs": {"x1": 3, "x2": 3}, "outputs": ["y"]}

    def __init__(self, dim: int = 16):
        super().__init__()
        self.stem1 = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.ReLU())
        self.stem2 = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.ReLU())
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.scale = dim ** -0.5

    def forward(self, x1, x2):
        f1, f2 = self.stem1(x1), self.stem2(x2)
        b, c, h, w = f1.shape
        t1, t2 = f1.flatten(2).transpose(1, 2), f2.flatten(2).transpose(1, 2)     # (B, N, C)
        scores = torch.matmul(self.q(t1), self.k(t2).transpose(1, 2)) * self.scale
        attended = torch.matmul(torch.softmax(scores, dim=-1), self.v(t2))
        return self.out(attended).transpose(1, 2).reshape(b, c, h, w)


def linear_cross():
    return LinearCross()


class MapsMha(nn.Module):
    """torch's nn.MultiheadAttention (sequence-first) between two feature maps flattened to tokens: the
    TorchScript exporter bakes the traced token count into its reshapes."""

    xattn_io = {"inputs": {"x1": 16, "x2": 16}, "outputs": ["y"]}

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)

    def forward(self, x1, x2):
        b, c, h, w = x1.shape
        query, key = x1.flatten(2).permute(2, 0, 1), x2.flatten(2).permute(2, 0, 1)
        return self.attn(query, key, key)[0].permute(1, 2, 0).reshape(b, c, h, w)


def maps_mha():
    return MapsMha()


class BigKernel(nn.Module):
    """An 8x8 stride-8 patch embedding (a ViT stem) before cross attention: maps below 8x8 have no patch, so
    torch.export narrows the height and width ranges to 8.. (a true narrowing, not a specialised size)."""

    xattn_io = {"inputs": {"x1": 3, "x2": 3}, "outputs": ["y"]}

    def __init__(self):
        super().__init__()
        self.embed1, self.embed2 = nn.Conv2d(3, 8, 8, stride=8), nn.Conv2d(3, 8, 8, stride=8)
        self.attn = CrossAttention(8, 8)

    def forward(self, x1, x2):
        return self.attn(self.embed1(x1), self.embed2(x2))


def big_kernel():
    return BigKernel()


big_kernel.xattn_io = BigKernel.xattn_io


class _NoOnnxTranslation(torch.nn.Module):
    """An eigendecomposition: neither torch.onnx exporter has a translation for it (dynamo nor TorchScript)."""

    xattn_io = {"inputs": {"x1": 3, "x2": 3}, "outputs": ["y"]}

    def forward(self, x1, x2):
        square = x1[:, :, :4, :4] @ x2[:, :, :4, :4].transpose(-1, -2)
        return torch.linalg.eigvals(square).real


def no_onnx_translation():
    return _NoOnnxTranslation().eval()


no_onnx_translation.xattn_io = _NoOnnxTranslation.xattn_io
