"""The three built-in models against independent re-statements of their arithmetic."""

import math

import numpy as np
import pytest
import torch

from xattn.models import CrossAttention, CrossAttentionNet, SeedCrossAttention
from xattn.errors import ShapeError


def _proj(conv, x):
    """A 1x1 conv written as a matmul: (B, C, H, W) -> (B, N, C_out)."""
    w = conv.weight[:, :, 0, 0]
    return torch.einsum("oc,bcn->bno", w, x.flatten(2)) + conv.bias


@pytest.mark.parametrize("heads", [1, 4])
def test_cross_attention_matches_direct_formula(heads):
    torch.manual_seed(1)
    block = CrossAttention(8, 16, num_heads=heads, kv_channels=5).eval()
    x1, x2 = torch.randn(2, 8, 7, 5), torch.randn(2, 5, 3, 11)  # different H, W, channels, positions
    q, k, v = _proj(block.conv_query, x1), _proj(block.conv_key, x2), _proj(block.conv_value, x2)
    d = 16 // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)   # (B, N1, N2)
        outs.append(a @ v[..., sl])                                                          # (B, N1, d)
    expected = torch.cat(outs, dim=-1).transpose(1, 2).reshape(2, 16, 7, 5)
    with torch.no_grad():
        got = block(x1, x2)
    assert got.shape == (2, 16, 7, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_seed_matches_snippet_arithmetic_in_numpy():
    torch.manual_seed(2)
    block = SeedCrossAttention(6, 6).eval()
    x1, x2 = torch.randn(2, 6, 4, 6), torch.randn(2, 6, 3, 8)  # 24 positions each, different shapes
    q, k, v = (_proj(c, x).detach().numpy().astype(np.float64)
               for c, x in ((block.conv_query, x1), (block.conv_key, x2), (block.conv_value, x2)))
    scores = q @ k.transpose(0, 2, 1)                      # (B, N1, N2), no 1/sqrt(d)
    att = np.exp(scores - scores.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    out = v.transpose(0, 2, 1) @ att                       # bmm(value, attention): (B, C, N2) @ (B, N1, N2)
    expected = out.reshape(2, 6, 4, 6)
    with torch.no_grad():
        got = block(x1, x2).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # ...and it is not what correct attention computes.
    correct = CrossAttention(6, 6).eval()
    correct.load_state_dict(block.state_dict())
    with torch.no_grad():
        assert not np.allclose(correct(x1, x2).numpy(), got, atol=1e-3)


def test_seed_refuses_different_position_counts_with_its_constraint():
    block = SeedCrossAttention(4, 4)
    with pytest.raises(ShapeError, match=r"same number of positions \(H1\*W1 == H2\*W2\).*bmm\(value, attention\)"):
        block(torch.randn(1, 4, 4, 6), torch.randn(1, 4, 5, 5))


def test_net_is_stems_attention_head():
    torch.manual_seed(3)
    net = CrossAttentionNet().eval()
    x1, x2 = torch.randn(1, 3, 9, 7), torch.randn(1, 3, 5, 12)
    with torch.no_grad():
        expected = torch.relu(net.head(net.attention(net.stem1(x1), net.stem2(x2))))
        got = net(x1, x2)
    assert got.shape == (1, 256, 9, 7)
    assert [m.weight.shape[:2] for m in (net.stem1[0], net.stem1[2], net.stem2[0], net.head)] == [
        (64, 3), (128, 64), (64, 3), (256, 128)]
    torch.testing.assert_close(got, expected)


def test_bad_head_count_is_refused():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        CrossAttention(8, 10, num_heads=3)
