"""Writing a benchmark's generated table into the README, between its two markers (shared by benchmarks/)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def write_between(markers: tuple[str, str], table: str, readme: Path = README) -> Path:
    """Replace what stands between ``markers`` in ``readme`` with ``table``; the rest is kept as it is."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    readme.write_text(text[:start] + "\n" + table + "\n" + text[end:], encoding="utf-8")
    return readme
