"""Cross-attention written the ways people write it: a corpus of small models, torch only.

Each model takes ``x1`` (queries) and ``x2`` (keys/values) as 3-channel maps of free sizes, embeds them
with a stride-4 patch conv into tokens of :data:`DIM` channels, attends, and returns ``y`` on x1's token
grid (1/4 of its size; a residual around attention). The styles follow public code: torch's ``nn.MultiheadAttention`` (batch- and
sequence-first, with ``key_padding_mask``), ``F.scaled_dot_product_attention`` (plain, boolean mask, additive
bias, causal, grouped-query), segment-anything's explicit matmul with the scale on the scores and head size 8,
multi-query (one K/V head), a single learned query token, einsum attention (softmax on the last axis, and on
a non-last axis as kornia's LoFTR ``FullAttention`` writes it), and LoFTR's linear attention (elu + 1, no
softmax). Referenced as ``tests.attention_styles:NAME``; :data:`STYLES` lists them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DIM = 16
IO = {"inputs": {"x1": 3, "x2": 3}, "outputs": ["y"]}


class _Styled(nn.Module):
    """Embedding, token layout and residual shared by every style; subclasses write ``attend``."""

    xattn_io = IO

    def __init__(self, heads: int = 2, dim: int = DIM):
        super().__init__()
        self.heads, self.dim, self.head_dim = heads, dim, dim // heads
        # patch embedding at 1/4 resolution (ViT, SAM and LoFTR stems shrink the maps before attention)
        self.embed1 = nn.Conv2d(3, dim, 4, stride=4)
        self.embed2 = nn.Conv2d(3, dim, 4, stride=4)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, tokens: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """(B, N, C) -> (B, H, N, d)"""
        b, n, _ = tokens.shape
        heads = heads or self.heads
        return tokens.reshape(b, n, heads, -1).transpose(1, 2)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        f1, f2 = self.embed1(x1), self.embed2(x2)
        b, c, h, w = f1.shape
        t1, t2 = f1.flatten(2).transpose(1, 2), f2.flatten(2).transpose(1, 2)   # (B, N, C)
        out = self.attend(t1, t2)
        return (t1 + out).transpose(1, 2).reshape(b, c, h, w)

    def attend(self, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MhaBatchFirst(_Styled):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(DIM, 2, batch_first=True)

    def attend(self, t1, t2):
        return self.mha(t1, t2, t2, need_weights=False)[0]


class MhaSeqFirstPadding(_Styled):
    """Sequence-first nn.MultiheadAttention with a key_padding_mask (keys whose first channel is very
    negative are padding; a row is never all padding at these sizes)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(DIM, 2)

    def attend(self, t1, t2):
        padding = t2[..., 0] < -3.0                                        # (B, N2) True = ignore
        out = self.mha(t1.transpose(0, 1), t2.transpose(0, 1), t2.transpose(0, 1), key_padding_mask=padding,
                       need_weights=False)[0]
        return out.transpose(0, 1)


class SdpaPlain(_Styled):
    def attend(self, t1, t2):
        q, k, v = self.split(self.q(t1)), self.split(self.k(t2)), self.split(self.v(t2))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))


class SdpaBoolMask(_Styled):
    def attend(self, t1, t2):
        q, k, v = self.split(self.q(t1)), self.split(self.k(t2)), self.split(self.v(t2))
        keep = (t2[..., 0] > -3.0)[:, None, None, :]                       # (B, 1, 1, N2) True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.o(out.transpose(1, 2).flatten(2))


class SdpaAdditiveBias(_Styled):
    def attend(self, t1, t2):
        q, k, v = self.split(self.q(t1)), self.split(self.k(t2)), self.split(self.v(t2))
        bias = -0.1 * t2[..., 1].abs()[:, None, None, :]                   # (B, 1, 1, N2) float bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(out.transpose(1, 2).flatten(2))


class SdpaCausal(_Styled):
    def attend(self, t1, t2):
        q, k, v = self.split(self.q(t1)), self.split(self.k(t2)), self.split(self.v(t2))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).flatten(2))


class SdpaGqa(_Styled):
    """Grouped-query attention: 4 query heads share 2 K/V heads."""

    def __init__(self):
        super().__init__(heads=4)
        self.k, self.v = nn.Linear(DIM, DIM // 2), nn.Linear(DIM, DIM // 2)

    def attend(self, t1, t2):
        q, k, v = self.split(self.q(t1)), self.split(self.k(t2), 2), self.split(self.v(t2), 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(out.transpose(1, 2).flatten(2))


class SamStyle(_Styled):
    """segment-anything's Attention: explicit matmul, the scale on the scores, head size 8."""

    def attend(self, t1, t2):
        q, k, v = self.split(self.q(t1)), self.split(self.k(t2)), self.split(self.v(t2))
        attn = q @ k.permute(0, 1, 3, 2)
        attn = attn / math.sqrt(self.head_dim)
        attn = torch.softmax(attn, dim=-1)
        return self.o((attn @ v).transpose(1, 2).flatten(2))


class MultiQuery(_Styled):
    """Multi-query attention: one K/V head broadcast against 2 query heads in the matmuls."""

    def __init__(self):
        super().__init__()
        self.k, self.v = nn.Linear(DIM, DIM // 2), nn.Linear(DIM, DIM // 2)

    def attend(self, t1, t2):
        q = self.split(self.q(t1))                                         # (B, 2, N1, 8)
        k, v = self.k(t2)[:, None], self.v(t2)[:, None]                    # (B, 1, N2, 8)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5
        return self.o(torch.matmul(scores.softmax(-1), v).transpose(1, 2).flatten(2))


class OneQueryToken(_Styled):
    """A learned query token attends over x2 (a class token, as in CrossViT); added at every x1 position."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, DIM))

    def attend(self, t1, t2):
        q = self.split(self.q(self.token.expand(t1.shape[0], -1, -1)))     # (B, H, 1, d)
        k, v = self.split(self.k(t2)), self.split(self.v(t2))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5
        pooled = torch.matmul(scores.softmax(-1), v).transpose(1, 2).flatten(2)  # (B, 1, C)
        return self.o(pooled).expand_as(t1)


class EinsumLast(_Styled):
    def attend(self, t1, t2):
        q, k, v = self.split(self.q(t1)), self.split(self.k(t2)), self.split(self.v(t2))
        scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * self.head_dim ** -0.5
        out = torch.einsum("bhnm,bhmd->bhnd", scores.softmax(dim=-1), v)
        return self.o(out.transpose(1, 2).flatten(2))


class EinsumLoftr(_Styled):
    """kornia LoFTR's FullAttention: (N, L, H, D) layout, softmax over the key axis 2 of 'nlsh'."""

    def attend(self, t1, t2):
        b, n1, _ = t1.shape
        q = self.q(t1).reshape(b, n1, self.heads, self.head_dim)
        k = self.k(t2).reshape(b, -1, self.heads, self.head_dim)
        v = self.v(t2).reshape(b, -1, self.heads, self.head_dim)
        qk = torch.einsum("nlhd,nshd->nlsh", q, k)
        a = torch.softmax(qk / self.head_dim ** 0.5, dim=2)
        out = torch.einsum("nlsh,nshd->nlhd", a, v)
        return self.o(out.reshape(b, n1, self.dim))


class LinearAttention(_Styled):
    """kornia LoFTR's LinearAttention: elu + 1 feature maps, O(N) in the positions, no softmax."""

    def attend(self, t1, t2):
        b, n1, _ = t1.shape
        q = F.elu(self.q(t1).reshape(b, n1, self.heads, self.head_dim)) + 1
        k = F.elu(self.k(t2).reshape(b, -1, self.heads, self.head_dim)) + 1
        v = self.v(t2).reshape(b, -1, self.heads, self.head_dim)
        n2 = v.shape[1]
        kv = torch.einsum("nshd,nshv->nhdv", k, v / n2)
        z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + 1e-6)
        out = torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * n2
        return self.o(out.reshape(b, n1, self.dim))


#: name -> (class, what a correct toolkit does with its attention)
STYLES = {
    "mha_batch_first": MhaBatchFirst,
    "mha_seq_first_padding": MhaSeqFirstPadding,
    "sdpa_plain": SdpaPlain,
    "sdpa_bool_mask": SdpaBoolMask,
    "sdpa_additive_bias": SdpaAdditiveBias,
    "sdpa_causal": SdpaCausal,
    "sdpa_gqa": SdpaGqa,
    "sam_style": SamStyle,
    "multi_query": MultiQuery,
    "one_query_token": OneQueryToken,
    "einsum_last": EinsumLast,
    "einsum_loftr": EinsumLoftr,
    "linear_attention": LinearAttention,
}


def _factory(cls):
    def make():
        torch.manual_seed(0)
        return cls().eval()

    make.xattn_io = IO
    make.__name__ = make.__qualname__ = cls.__name__
    return make


for _name, _cls in STYLES.items():
    globals()[_name] = _factory(_cls)


class TorchDecoder(nn.Module):
    """torch's nn.TransformerDecoder (one layer, batch-first): self-attention on x1's tokens, then cross
    attention to x2's, then the feed-forward block."""

    xattn_io = IO

    def __init__(self):
        super().__init__()
        self.embed1 = nn.Conv2d(3, DIM, 4, stride=4)
        self.embed2 = nn.Conv2d(3, DIM, 4, stride=4)
        layer = nn.TransformerDecoderLayer(DIM, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=1)

    def forward(self, x1, x2):
        f1, f2 = self.embed1(x1), self.embed2(x2)
        b, c, h, w = f1.shape
        out = self.decoder(f1.flatten(2).transpose(1, 2), f2.flatten(2).transpose(1, 2))
        return out.transpose(1, 2).reshape(b, c, h, w)


STYLES["torch_decoder"] = TorchDecoder
torch_decoder = _factory(TorchDecoder)
