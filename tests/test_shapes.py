import pytest

from xattn.errors import ShapeError
from xattn.shapes import check_profile, format_shape_set, parse_shape_set


def test_round_trip():
    text = "x1:2x3x64x48,x2:2x3x32x80"
    parsed = parse_shape_set(text)
    assert parsed == {"x1": (2, 3, 64, 48), "x2": (2, 3, 32, 80)}
    assert format_shape_set(parsed) == text


@pytest.mark.parametrize("text, message", [
    ("", "empty shape set"),
    ("x1=1x3x4x4", "cannot parse shape"),
    ("x1:1x3xax4", "dimension 'a' of 'x1'"),
    ("x1:1x3x0x4", "dimension '0' of 'x1'"),
    ("x1:1x3x4x4,x1:1x3x4x4", "appears twice"),
])
def test_parse_errors(text, message):
    with pytest.raises(ShapeError, match=message):
        parse_shape_set(text)


def test_profile_checks():
    low, opt, high = (parse_shape_set(t) for t in ("x1:1x3x8x8", "x1:1x3x16x16", "x1:2x3x4x32"))
    with pytest.raises(ShapeError, match="axis 2: need min <= opt <= max, got 8, 16, 4"):
        check_profile(low, opt, high)
    with pytest.raises(ShapeError, match="different ranks"):
        check_profile(low, parse_shape_set("x1:1x3x16"), high)
