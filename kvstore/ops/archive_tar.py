"""Reading an archive's tar safely: headers checked before tarfile parses them, members bounded before they are read.

An archive is untrusted input. Two of tarfile's own paths are unsafe on it: a PAX header's records
go through a regular expression that backtracks quadratically (CVE-2024-6232, in the Python 3.11
this runs on: a 100k-digit header held an import for 68 s), and a sparse member expands to as many
bytes as its header claims (a 92 KB archive became a 1 GiB blob). `scan` walks the raw 512-byte
header blocks first and refuses both; `members` then bounds every member by the bytes that are
really in the file.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from typing import Any

import numpy as np

from kvstore.errors import ArchiveError
from kvstore.formats import BLOB_SUFFIX

MANIFEST = "manifest.json"
BLOB_PREFIX = "blobs/"
BLOCK = 512
MAX_MANIFEST = 1 << 30  # a manifest is token ids and rows: a gigabyte of it is not an archive we wrote
# Extended headers (PAX 'x'/'g', GNU long name 'L'/'K') of an archive we wrote are a few hundred
# bytes at most; a bound this small keeps even tarfile's quadratic PAX regex to milliseconds.
MAX_EXTENDED_HEADER = 16 << 10
MAX_MEMBERS = 1 << 22
MAX_JSON_DEPTH = 64  # a manifest nests 4 deep; metadata is the caller's, but never this deep
_HEX32 = re.compile(r"[0-9a-f]{32}")
_PAX_RECORD = re.compile(rb"([1-9][0-9]{0,19}) ")  # "<length> <key>=<value>\n", length in decimal

__all__ = [
    "MANIFEST",
    "BLOB_PREFIX",
    "bad",
    "open_archive",
    "members",
    "read_member",
    "manifest_bytes",
    "parse_manifest",
    "json_depth",
]


def bad(msg: str) -> ArchiveError:
    return ArchiveError(f"the archive is damaged or was edited: {msg}; nothing was imported")


def _size_field(block: bytes) -> int:
    """The size field of a ustar header block (octal text, or GNU base-256 for large members)."""
    field = block[124:136]
    if field[0] & 0x80:  # base-256: a big-endian number in the remaining bytes
        if field[0] != 0x80:
            raise bad("a tar header's size is negative")
        return int.from_bytes(field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    if not text:
        return 0
    if not re.fullmatch(rb"[0-7]+", text):
        raise bad("a tar header's size field is not a number")
    return int(text, 8)


def _check_pax_records(data: bytes) -> None:
    """Well-formed "<length> key=value\\n" records, parsed by length and never by backtracking."""
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # padding after the last record
            if data[pos:].strip(b"\0"):
                raise bad("a PAX header has bytes after its padding")
            return
        m = _PAX_RECORD.match(data, pos)
        if m is None:
            raise bad("a PAX header record does not start with its length")
        end = pos + int(m.group(1))
        if end > len(data) or data[end - 1 : end] != b"\n" or b"=" not in data[m.end() : end]:
            raise bad("a PAX header record is malformed")
        pos = end


def scan(f) -> None:
    """Walk the raw tar headers of an open file: refuse oversized or malformed extended headers
    and sparse members before tarfile sees any of them."""
    total = os.fstat(f.fileno()).st_size
    pos = count = 0
    while pos + BLOCK <= total:
        f.seek(pos)
        block = f.read(BLOCK)
        if block == b"\0" * BLOCK:
            return  # end of archive
        count += 1
        if count > MAX_MEMBERS:
            raise bad(f"it has more than {MAX_MEMBERS} tar headers")
        kind = block[156:157]
        size = _size_field(block)
        data_end = pos + BLOCK + size
        if data_end > total:
            raise bad(f"a tar member claims {size} bytes, more than the file holds")
        if kind in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENDED_HEADER:
                raise bad(f"a tar extended header is {size} bytes (the limit is {MAX_EXTENDED_HEADER})")
            if kind in (b"x", b"g"):
                f.seek(pos + BLOCK)
                data = f.read(size)
                _check_pax_records(data)
                if b"GNU.sparse" in data:
                    raise bad("it has a sparse member")
        elif kind == b"S":
            raise bad("it has a sparse member")
        pos += BLOCK + -(-size // BLOCK) * BLOCK


def open_archive(file: str | os.PathLike) -> tarfile.TarFile:
    """The archive opened for reading, once its raw headers passed `scan`."""
    try:
        f = open(file, "rb")
    except OSError as e:
        raise ArchiveError(f"cannot read the archive {file}: {e.strerror}") from None
    try:
        scan(f)
        f.seek(0)
        return tarfile.open(fileobj=f, mode="r:")
    except (tarfile.TarError, EOFError) as e:
        f.close()
        raise ArchiveError(f"{file} is not a kvstore archive (an uncompressed tar): {e}") from None
    except BaseException:
        f.close()
        raise


def members(tar: tarfile.TarFile) -> tuple[tarfile.TarInfo, dict[str, tarfile.TarInfo]]:
    """The manifest member and blob id -> member; anything else in the archive is refused.

    Every member's bytes must lie in the file: none is sparse, none reaches past the end.
    """
    manifest, blobs = None, {}
    total = os.fstat(tar.fileobj.fileno()).st_size  # type: ignore[attr-defined]  # a real file (open_archive)
    for m in tar.getmembers():
        if not m.isfile() or m.issparse() or m.type == tarfile.GNUTYPE_SPARSE:
            raise bad(f"member {m.name[:80]!r} is not a regular file")
        if m.offset_data + m.size > total:
            raise bad(f"member {m.name[:80]!r} claims more bytes than the file holds")
        if m.name == MANIFEST:
            if manifest is not None:
                raise bad(f"{MANIFEST} appears twice")
            manifest = m
            continue
        blob_id = (
            m.name[len(BLOB_PREFIX) : -len(BLOB_SUFFIX)]
            if m.name.startswith(BLOB_PREFIX) and m.name.endswith(BLOB_SUFFIX)
            else ""
        )
        if not _HEX32.fullmatch(blob_id):
            raise bad(f"unexpected member {m.name[:80]!r}")
        if blob_id in blobs:
            raise bad(f"blob {blob_id} appears twice")
        blobs[blob_id] = m
    if manifest is None:
        raise bad(f"it has no {MANIFEST} (is it a kvstore export?)")
    return manifest, blobs


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytearray:
    data = bytearray(member.size)
    view = memoryview(data)
    f = tar.extractfile(member)
    got = 0
    while got < member.size:
        n = f.readinto(view[got:])  # type: ignore[attr-defined]  # an ExFileObject, a BufferedReader
        if not n:
            break
        got += n
    if got != member.size:
        raise bad(f"member {member.name} is truncated")
    return data


def json_depth(raw: bytes | bytearray) -> int:
    """How deeply JSON text nests, counted without parsing it (no recursion, linear time)."""
    bare = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", bytes(raw))  # brackets inside strings do not nest
    codes = np.frombuffer(bare, dtype=np.uint8)
    at = codes[np.flatnonzero((codes == 0x5B) | (codes == 0x7B) | (codes == 0x5D) | (codes == 0x7D))]
    steps = np.where((at == 0x5B) | (at == 0x7B), 1, -1).astype(np.int32)  # one per bracket: few in a manifest
    return int(np.cumsum(steps).max()) if steps.size else 0


def manifest_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytearray:
    if member.size > MAX_MANIFEST:
        raise bad(f"its manifest is {member.size} bytes")
    return read_member(tar, member)


def parse_manifest(raw: bytes | bytearray) -> Any:
    """The manifest's JSON, refused before parsing if it nests deeper than any manifest we write."""
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise bad(f"its manifest nests more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad(f"its manifest is not JSON ({str(e)[:200]})") from None
