"""The built-in cross-attention models.

Three models, all taking queries from ``x1`` and keys/values from ``x2`` (NCHW feature maps whose
heights and widths are free and independent) and returning ``y`` at ``x1``'s spatial size:

* :class:`CrossAttention` (``cross-attention``): the correct block.
* :class:`SeedCrossAttention` (``seed-cross-attention``): the widely copied snippet, bit for bit.
* :class:`CrossAttentionNet` (``cross-attention-net``, the default): two conv stems, cross attention
  at 128 channels, a conv head to 256 channels.

Attention is written as explicit MatMul / Softmax / MatMul (not ``scaled_dot_product_attention``) so
the exported ONNX keeps a stable, recognisable pattern: FP16 conversion keeps exactly those nodes in
FP32 and INT8 quantization leaves exactly those nodes in float.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xattn.errors import ShapeError


class CrossAttention(nn.Module):
    """Cross attention between two feature maps with independent spatial sizes.

    ``y = softmax(Q K^T / sqrt(head_dim)) V`` per head, with ``Q = conv_query(x1)``,
    ``K = conv_key(x2)``, ``V = conv_value(x2)`` (1x1 convolutions). ``y`` has ``out_channels``
    channels and ``x1``'s height and width.

    Args:
        in_channels: channels of ``x1``.
        out_channels: channels of the projections and of the output; must divide by ``num_heads``.
        num_heads: attention heads (default 1).
        kv_channels: channels of ``x2``; ``None`` (default) means the same as ``in_channels``.

    The parameter names are the seed snippet's (``conv_query``, ``conv_key``, ``conv_value``), so a
    checkpoint trained with the snippet also loads here (it then computes the corrected attention).
    """

    def __init__(self, in_channels: int, out_channels: int, num_heads: int = 1, kv_channels: int | None = None):
        super().__init__()
        if num_heads < 1 or out_channels % num_heads:
            raise ValueError(f"out_channels={out_channels} must be a positive multiple of num_heads={num_heads}")
        kv_channels = in_channels if kv_channels is None else kv_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kv_channels, self.num_heads = kv_channels, num_heads
        self.head_dim = out_channels // num_heads
        self.conv_query = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.conv_key = nn.Conv2d(kv_channels, out_channels, kernel_size=1)
        self.conv_value = nn.Conv2d(kv_channels, out_channels, kernel_size=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x1.shape
        heads, head_dim = self.num_heads, self.head_dim
        # (B, C, H, W) -> (B, heads, N, head_dim); -1 keeps the position count symbolic on export.
        query = self.conv_query(x1).reshape(batch, heads, head_dim, -1).transpose(2, 3)
        key = self.conv_key(x2).reshape(batch, heads, head_dim, -1)
        value = self.conv_value(x2).reshape(batch, heads, head_dim, -1).transpose(2, 3)
        # Scale the scores, not the queries: keeps the textbook graph (MatMul -> Mul -> Softmax)
        # that TensorRT's attention fusion and our FP16 block list look for.
        scores = torch.matmul(query, key) * (1.0 / math.sqrt(head_dim))   # (B, heads, N1, N2)
        weights = torch.softmax(scores, dim=-1)                            # over keys
        out = torch.matmul(weights, value)                                 # (B, heads, N1, head_dim)
        return out.transpose(2, 3).reshape(batch, self.out_channels, height, width)


class SeedCrossAttention(nn.Module):
    """The widely copied cross-attention snippet, reproduced bit for bit. Prefer :class:`CrossAttention`.

    Kept so that checkpoints trained with the snippet load unchanged (same parameter names) and export
    to exactly what they computed. Its arithmetic has two defects, kept on purpose:

    1. the output is ``bmm(value, attention)``: ``attention`` has queries on its rows, so this product
       is transposed; it only type-checks when ``x1`` and ``x2`` have the same number of positions
       (H1*W1 == H2*W2), and then mixes positions wrongly;
    2. the scores are not scaled by ``1/sqrt(d)``, so the softmax saturates as channels grow.

    (The snippet's example network also applied its 64-channel ``conv2`` to the raw 3-channel ``x2``
    and crashed; :class:`CrossAttentionNet` is that network fixed.)

    Args:
        in_channels: channels of ``x1`` and ``x2``.
        out_channels: channels of the projections and of the output.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv_query = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.conv_key = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.conv_value = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x1.shape
        if not _tracing():
            positions1, positions2 = height * width, x2.shape[2] * x2.shape[3]
            if positions1 != positions2:
                raise ShapeError(
                    f"seed-cross-attention needs x1 and x2 with the same number of positions "
                    f"(H1*W1 == H2*W2), got {height}x{width}={positions1} and "
                    f"{x2.shape[2]}x{x2.shape[3]}={positions2}: the snippet computes bmm(value, attention)",
                    hint="use the model 'cross-attention' for maps of different sizes")
        query = self.conv_query(x1).view(batch, -1, height * width).permute(0, 2, 1)   # (B, N1, C)
        key = self.conv_key(x2).view(batch, self.out_channels, -1)                     # (B, C, N2)
        value = self.conv_value(x2).view(batch, self.out_channels, -1)                 # (B, C, N2)
        attention = F.softmax(torch.bmm(query, key), dim=-1)                           # (B, N1, N2), unscaled
        out = torch.bmm(value, attention)                                              # the snippet's product
        # The snippet reshapes with x1's channel count; out_channels is the same number whenever the
        # snippet runs at all, and keeps the exported channel axis static.
        return out.view(batch, self.out_channels, height, width)


class CrossAttentionNet(nn.Module):
    """The snippet's intended network, fixed: one conv stem per input, cross attention, a conv head.

    ``x1``/``x2`` (``in_channels`` each) -> 3x3 conv to ``stem_channels`` + ReLU -> 3x3 conv to
    ``attn_channels`` + ReLU (separate weights per input) -> :class:`CrossAttention` ->
    3x3 conv to ``out_channels`` + ReLU. Spatial sizes are kept (padding 1).

    Args:
        in_channels: image channels of both inputs (default 3).
        stem_channels: width of the first stem conv (default 64).
        attn_channels: width of the attention (default 128).
        out_channels: output channels (default 256).
        num_heads: attention heads (default 1).
    """

    def __init__(self, in_channels: int = 3, stem_channels: int = 64, attn_channels: int = 128,
                 out_channels: int = 256, num_heads: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.stem1 = _stem(in_channels, stem_channels, attn_channels)
        self.stem2 = _stem(in_channels, stem_channels, attn_channels)
        self.attention = CrossAttention(attn_channels, attn_channels, num_heads=num_heads)
        self.head = nn.Conv2d(attn_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return F.relu(self.head(self.attention(self.stem1(x1), self.stem2(x2))))


def _stem(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(),
    )


def _tracing() -> bool:
    """True while torch.export / dynamo / the TorchScript tracer records the graph.

    The shape check in :class:`SeedCrossAttention` must not be recorded: under torch.export it would
    tie x2's dynamic axes to x1's and make them non-free.
    """
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())
