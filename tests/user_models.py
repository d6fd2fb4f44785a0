"""Users' own model factories, referenced as ``tests.user_models:NAME`` in tests."""

from torch import nn

from exporter.models import CrossAttention


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
