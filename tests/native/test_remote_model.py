import asyncio

import pytest

from tabmesh.model.remote import parse_content_range, read_header, split_ranges
from tabmesh.gguf import read_gguf_path
from test_gguf import REPO_ROOT, model_path  # the shipped SmolLM2 file


def test_split_ranges_are_aligned_and_cover_exactly():
    got = split_ranges([(5, 30), (40, 41)], piece=10)
    assert got == [(5, 10), (10, 20), (20, 30), (40, 41)]
    assert split_ranges([(0, 10)], piece=10) == [(0, 10)]
    with pytest.raises(ValueError):
        split_ranges([(5, 5)])


def test_content_range():
    assert parse_content_range("bytes 0-99/98362432") == 98362432
    assert parse_content_range("bytes */100") == 100
    assert parse_content_range("bytes 0-9/*") is None
    assert parse_content_range(None) is None


def test_read_header_grows_the_prefix_until_it_parses():
    path = model_path(REPO_ROOT)
    if not path.exists():
        pytest.skip(f"{path} is absent: `make test` runs setup, which downloads it")
    data = path.read_bytes()[: 8 << 20]
    asked = []

    async def fetch(start, end):
        asked.append((start, end))
        return data[start:end]

    size = path.stat().st_size
    remote = asyncio.run(read_header(fetch, size, first=64 * 1024))
    local = read_gguf_path(path)
    assert len(asked) > 1 and asked[0] == (0, 64 * 1024)
    assert remote.tensors == local.tensors and remote.data_offset == local.data_offset
    assert remote.metadata["general.architecture"] == "llama"
