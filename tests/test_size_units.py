"""One meaning for "10G" everywhere (issue 25): the server's budgets and an S3 store's disk tier read sizes
with the same parser, K/M/G/T and KiB/MiB/GiB/TiB binary, KB/MB/GB/TB decimal."""

from __future__ import annotations

import pytest

from kvstore.server import parse_size as server_parse_size
from kvstore.sizes import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("512B", 512),
        ("1K", 1024),
        ("1k", 1024),
        ("1KiB", 1024),
        ("1KB", 1000),
        ("512M", 512 * 2**20),
        ("512MiB", 512 * 2**20),
        ("512mb", 512 * 10**6),
        ("10G", 10 * 2**30),
        ("10 GiB", 10 * 2**30),
        ("10GB", 10 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("2T", 2 * 2**40),
        ("2TB", 2 * 10**12),
        (7, 7),
        (None, None),
    ],
)
def test_sizes_have_one_meaning(text, expected):
    assert parse_size(text) == expected
    assert server_parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "G", "ten", "10 X", "10GiBs", "-1", "1e9", "10.G", -5])
def test_what_is_not_a_size_is_refused(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_the_server_and_the_s3_tier_use_the_one_parser():
    """(The S3 disk tier's own parser read 10G as 10 x 2^30 while `serve --max-disk` read 10^10.)"""
    import kvstore.blob.s3 as s3
    import kvstore.server.config as config

    assert not hasattr(s3, "parse_size") and not hasattr(config, "parse_size")
    assert server_parse_size is parse_size
