"""The committed golden vectors decode to their stored form and re-encode to the same bytes."""

from __future__ import annotations

import json

import pytest

from protocol import decode_frame, encode_frame
from tests.protocol.vectors import CASES, VECTORS, expected_form


@pytest.mark.parametrize("name", sorted(CASES))
def test_vector_decodes_to_its_stored_form(name: str) -> None:
    """The bytes on disk decode to the JSON on disk."""
    frame = decode_frame((VECTORS / f"{name}.bin").read_bytes())
    assert json.loads((VECTORS / f"{name}.json").read_text()) == expected_form(frame)


@pytest.mark.parametrize("name", sorted(CASES))
def test_encoder_still_produces_the_vector(name: str) -> None:
    """Today's encoder produces exactly the committed bytes."""
    frame, compress = CASES[name]
    assert (VECTORS / f"{name}.bin").read_bytes() == encode_frame(frame, compress=compress)


def test_vector_header() -> None:
    """Every vector starts with magic SM and version 1; the zstd one has flag bit 0 set."""
    for name in CASES:
        head = (VECTORS / f"{name}.bin").read_bytes()[:4]
        assert b"SM\x01" == head[:3]
        assert (1 if name.endswith("zstd") else 0) == head[3]
