"""Blobs in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Cloudflare R2, SeaweedFS), a disk tier in front.

An object's key is its blob id (`<prefix>/blobs/ab/cdef….safetensors`, the content hash), so a
PUT of a blob that exists is made conditional (`If-None-Match: *`): one round trip writes it or
says it is there. A PUT that returns is durable (S3 is strongly consistent), which is what the
write protocol asks before the index commit. Reads are hashed like a folder's; restores fetch
their blobs concurrently into the local disk tier (kvstore.blob.tier) and scatter-read from there.

The client is obstore (Rust's object_store): it releases the GIL for the whole request, so a
thread pool of GETs runs at the server's speed; it retries 5xx, throttling and dropped
connections with exponential backoff and jitter; and DeleteObjects batches gc's deletes. A hash
mismatch is never retried: the bytes the server holds are wrong, and asking again returns them again.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import xxhash

from kvstore.blob.backend import BlobBackend, PathOf
from kvstore.blob.tier import DiskTier, check_blob_id
from kvstore.errors import (
    BlobServiceError,
    CorruptBlobError,
    MissingBlobError,
    NoSuchBucketError,
    StoreAccessDeniedError,
    StoreError,
)
from kvstore.formats import BLOB_SUFFIX

DEFAULT_CACHE_SIZE = 10 << 30  # the disk tier's budget when none is given
DEFAULT_CONCURRENCY = 16  # GETs in flight during a restore: enough to fill a loopback or LAN link
PART = 8 << 20  # ranged GETs of a large blob: on loopback SeaweedFS, 8 MiB parts gave 1.5x whole-object GETs
DELETE_BATCH = 1000  # keys per DeleteObjects request (S3's limit)
URL_OPTIONS = {"endpoint", "region", "profile", "concurrency", "retries", "retry_timeout", "conditional"}


@dataclass(frozen=True)
class S3Location:
    """Where an s3:// URL points, and how to talk to it."""

    bucket: str
    prefix: str
    endpoint: str | None
    region: str | None
    profile: str | None
    concurrency: int
    retries: int
    retry_timeout: float
    conditional: bool

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def parse_url(url: str) -> S3Location:
    """s3://bucket[/prefix][?endpoint=http://host:port&region=…&profile=…&concurrency=16&retries=5&retry_timeout=30]."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise StoreError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix?endpoint=http://host:port)")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - URL_OPTIONS
    if unknown:
        raise StoreError(
            f"unknown option(s) in {url!r}: {', '.join(sorted(unknown))} (known: {', '.join(sorted(URL_OPTIONS))})"
        )
    try:
        concurrency = int(query.get("concurrency", DEFAULT_CONCURRENCY))
        retries = int(query.get("retries", 5))
        retry_timeout = float(query.get("retry_timeout", 30))
    except ValueError as e:
        raise StoreError(f"a numeric option in {url!r} is not a number: {e}") from None
    if concurrency < 1 or retries < 0 or retry_timeout <= 0:
        raise StoreError(f"{url!r}: concurrency must be >= 1, retries >= 0, retry_timeout > 0")
    return S3Location(
        bucket=parts.netloc,
        prefix=parts.path.strip("/"),
        endpoint=query.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region=query.get("region"),
        profile=query.get("profile"),
        concurrency=concurrency,
        retries=retries,
        retry_timeout=retry_timeout,
        conditional=query.get("conditional", "1") not in ("0", "false", "no"),
    )


def profile_credentials(profile: str | None) -> dict:
    """Static keys and region of a profile in ~/.aws/credentials and ~/.aws/config (the AWS CLI's files).

    Environment variables win (obstore reads them itself); a profile named in the URL or in
    AWS_PROFILE is read here because object_store does not read the shared files.
    """
    name = profile or os.environ.get("AWS_PROFILE") or "default"
    if profile is None and os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    creds = configparser.ConfigParser()
    creds.read(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials")
    conf = configparser.ConfigParser()
    conf.read(os.environ.get("AWS_CONFIG_FILE") or Path.home() / ".aws" / "config")
    section = dict(creds[name]) if creds.has_section(name) else {}
    conf_name = name if name == "default" else f"profile {name}"
    config = dict(conf[conf_name]) if conf.has_section(conf_name) else {}
    if profile is not None and not section and not config:
        raise StoreAccessDeniedError(f"AWS profile {profile!r} is not in ~/.aws/credentials or ~/.aws/config")
    out = {}
    for key, ours in (
        ("aws_access_key_id", "access_key_id"),
        ("aws_secret_access_key", "secret_access_key"),
        ("aws_session_token", "session_token"),
    ):
        value = section.get(key) or config.get(key)
        if value:
            out[ours] = value
    if config.get("region"):
        out["region"] = config["region"]
    return out


@dataclass(frozen=True)
class ObjectEntry:
    """One listed object: gc and fsck read its size and age without another request."""

    key: str
    size: int
    modified: float


def _translate(e: Exception, what: str, where: str) -> Exception:
    """obstore's errors as the store's: credentials and a missing bucket get messages that name the fix."""
    import obstore.exceptions as oe

    text = str(e)
    if (
        isinstance(e, (oe.PermissionDeniedError, oe.UnauthenticatedError))
        or "SignatureDoesNotMatch" in text
        or "InvalidAccessKeyId" in text
        or "AccessDenied" in text
    ):
        return StoreAccessDeniedError(
            f"{where} refused the credentials while {what}: check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or the profile) and the bucket's policy"
        )
    if "NoSuchBucket" in text:
        return NoSuchBucketError(f"{where}: the bucket does not exist; create it (e.g. `aws s3 mb`) first")
    first = text.splitlines()[0] if text else type(e).__name__
    return BlobServiceError(f"{where}: {what} failed: {first[:300]}")


class S3Blobs(BlobBackend):
    """A store's blobs under s3://bucket/prefix/blobs/, read through a local disk tier."""

    remote = True

    def __init__(self, url: str, cache_dir: str | os.PathLike | None = None, cache_size: int | None = None):
        from obstore.store import S3Store

        self.loc = parse_url(url)
        self.durable = True  # a PUT that returned is durable; there is nothing to fsync
        keys = profile_credentials(self.loc.profile)
        config: dict = {k: v for k, v in keys.items() if k != "region"}
        region = (
            self.loc.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or keys.get("region")
            or "us-east-1"
        )
        config["region"] = region
        if self.loc.endpoint:
            config["endpoint"] = self.loc.endpoint
        retry = {
            "max_retries": self.loc.retries,
            "retry_timeout": timedelta(seconds=self.loc.retry_timeout),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5), "base": 2.0},
        }
        client = {
            "allow_http": bool(self.loc.endpoint and self.loc.endpoint.startswith("http://")),
            "pool_max_idle_per_host": str(self.loc.concurrency * 2),
        }
        self.base = f"{self.loc.prefix}/blobs" if self.loc.prefix else "blobs"
        try:
            # Typed as Any: they are obstore's S3Config, ClientConfig and RetryConfig, built at run time.
            options: dict[str, Any] = {"config": config, "client_options": client, "retry_config": retry}
            self.client = S3Store(self.loc.bucket, **options)
        except Exception as e:  # a malformed endpoint or option: obstore says which
            raise StoreError(f"cannot use {self.loc.url}: {e}") from None
        size = DEFAULT_CACHE_SIZE if cache_size is None else cache_size
        self.tier = DiskTier(Path(cache_dir) if cache_dir else default_tier_dir(self.loc), size)
        self.concurrency = self.loc.concurrency
        self._bad_remote: set[str] = set()  # ids whose bucket copy failed its hash in this process
        self._pool = ThreadPoolExecutor(max_workers=self.loc.concurrency, thread_name_prefix="kvstore-s3")

    # -- naming ----------------------------------------------------------------------------

    def key(self, blob_id: str) -> str:
        """The object key of a blob, from a checked id (as BlobStore.path: a crafted row names no other key)."""
        check_blob_id(blob_id)
        return f"{self.base}/{blob_id[:2]}/{blob_id[2:]}{BLOB_SUFFIX}"

    def describe_location(self) -> str:
        return f"{self.loc.url}/blobs"

    def name_of(self, blob_id: str) -> str:
        return f"s3://{self.loc.bucket}/{self.key(blob_id)}"

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        import obstore.exceptions as oe

        try:
            return fn(*args, **kwargs)
        except oe.AlreadyExistsError:
            raise
        except (FileNotFoundError, oe.NotFoundError) as e:
            if "NoSuchBucket" in str(e):  # AWS answers 404 for a missing bucket too: not a missing blob
                raise _translate(e, what, self.loc.url) from None
            raise
        except Exception as e:
            raise _translate(e, what, self.loc.url) from None

    def check_bucket(self) -> None:
        """One LIST of at most one key: wrong credentials or a missing bucket fail here, at open."""
        import obstore as obs

        stream = self._list(obs.list, self.client, self.base + "/", chunk_size=1)
        self._list(next, iter(stream), None)

    def _list(self, fn: Callable, *args, **kwargs):
        """A LIST request: a 404 can only mean that the bucket is missing."""
        import obstore.exceptions as oe

        try:
            return self._call("listing the bucket", fn, *args, **kwargs)
        except (FileNotFoundError, oe.NotFoundError) as e:
            raise NoSuchBucketError(
                f"{self.loc.url}: the bucket does not exist; create it (e.g. `aws s3 mb`) first"
            ) from e

    # -- writing ---------------------------------------------------------------------------

    def put(
        self, buffers: list, blob_id: str | None = None, copied: Callable[[str], None] | None = None
    ) -> tuple[str, int, bool]:
        import obstore as obs
        import obstore.exceptions as oe

        data = b"".join(buffers) if len(buffers) != 1 else bytes(buffers[0])
        real = xxhash.xxh3_128_hexdigest(data)  # ~0.1 s per GiB: cheap next to the PUT it guards
        blob_id = blob_id or real
        if real != blob_id:  # a caller's bug, never the network's: refuse rather than store a lie
            raise CorruptBlobError(f"blob {blob_id}: the bytes to store hash to {real}", blob_id)
        if copied is not None:
            copied(blob_id)
        key = self.key(blob_id)
        written = False
        if self.loc.conditional:  # one round trip: written, or 412 because the object exists
            try:
                self._call(
                    f"writing blob {blob_id}", obs.put, self.client, key, data, mode="create", use_multipart=False
                )
                written = True
            except oe.AlreadyExistsError:
                pass
        if not written:
            # The key names the content, but a truncated object would keep it: the same size, or write it
            # again (also when a gc removed it since the 412).
            st = self.stat(blob_id)
            if st is None or st[0] != len(data):
                self._call(f"writing blob {blob_id}", obs.put, self.client, key, data, use_multipart=False)
                written = True
        if written:
            self._bad_remote.discard(blob_id)  # written again (a recovery after discard_blob): good now
        try:
            self.tier.add(blob_id, [data])  # write-through: an agent saved now is often restored next
        except OSError:
            pass  # the tier is a cache: a full local disk must not fail a save that S3 took
        return blob_id, len(data), written

    # -- reading ---------------------------------------------------------------------------

    def _get(self, blob_id: str, agent: str | None = None):
        import obstore as obs
        import obstore.exceptions as oe

        try:
            return self._call(f"reading blob {blob_id}", obs.get, self.client, self.key(blob_id)).bytes()
        except (FileNotFoundError, oe.NotFoundError):
            who = f" (needed by agent {agent!r})" if agent else ""
            raise MissingBlobError(
                f"blob {blob_id} is missing from {self.describe_location()}{who}", blob_id, agent
            ) from None

    def _fetch(self, blob_id: str, agent: str | None, keep: frozenset[str]) -> memoryview:
        """GET a blob, check its hash, keep it in the tier."""
        data = memoryview(self._get(blob_id, agent))
        self._keep(blob_id, [data], agent, keep)
        return data

    def read(self, blob_id: str, agent: str | None = None) -> bytearray:
        path = self.tier.path(blob_id)
        if self.tier.has(blob_id):
            try:
                data = bytearray(path.read_bytes())
                if xxhash.xxh3_128_hexdigest(data) == blob_id:
                    return data
            except FileNotFoundError:
                pass
            self.tier.drop(blob_id)  # damaged or evicted under us: the bucket has the real one
        return bytearray(self._fetch(blob_id, agent, frozenset()))

    def read_range(self, blob_id: str, start: int, end: int) -> bytes:
        import obstore as obs
        import obstore.exceptions as oe

        try:
            return bytes(
                self._call(
                    f"reading blob {blob_id}", obs.get_range, self.client, self.key(blob_id), start=start, end=end
                )
            )
        except (FileNotFoundError, oe.NotFoundError):
            raise MissingBlobError(f"blob {blob_id} is missing from {self.describe_location()}", blob_id) from None

    def local_paths(self, blob_ids: Iterable[str], agent: str | None = None) -> PathOf:
        """Fetch the blobs the tier lacks, concurrently; the tier's path function.

        Bounded by bandwidth, not round trips: up to `concurrency` GETs in flight, and a blob larger
        than PART is read as ranged GETs of PART bytes, so a few large blobs (Llama-3-8B's chunks are
        32 MiB) still keep every connection busy. Each blob is verified once whole, then kept in the
        tier; the blobs of this restore are spared by the tier's eviction until the next one.
        """
        ids = frozenset(blob_ids)
        need = sorted(b for b in ids if not self.tier.has(b))
        if not need:
            return self.tier.path
        # Round 1: the first PART of each blob, which also tells its size (one request for most blobs).
        heads = dict(zip(need, self._pool.map(lambda b: self._get_part(b, 0, agent), need)))
        parts: dict[str, dict[int, object]] = {b: {0: data} for b, (_size, data) in heads.items()}
        rest = [(b, start) for b, (size, data) in heads.items() for start in range(len(data), size, PART)]
        heads.clear()

        # Round 2: the other parts, all at once. They stay as the client's buffers: no assembly copy, the
        # hash runs over them in order and the tier file is written from them with one writev.
        def fetch(part):
            b, start = part
            parts[b][start] = self._get_part(b, start, agent)[1]

        for _ in self._pool.map(fetch, rest):
            pass
        for _ in self._pool.map(lambda b: self._keep(b, [parts[b][k] for k in sorted(parts[b])], agent, ids), need):
            pass
        return self.tier.path

    def _get_part(self, blob_id: str, start: int, agent: str | None):
        """(object size, bytes [start, start + PART)) of a blob."""
        import obstore as obs
        import obstore.exceptions as oe

        try:
            got = self._call(
                f"reading blob {blob_id}",
                obs.get,
                self.client,
                self.key(blob_id),
                options={"range": (start, start + PART)},
            )
            return int(got.meta["size"]), got.bytes()
        except (FileNotFoundError, oe.NotFoundError):
            who = f" (needed by agent {agent!r})" if agent else ""
            raise MissingBlobError(
                f"blob {blob_id} is missing from {self.describe_location()}{who}", blob_id, agent
            ) from None

    def _keep(self, blob_id: str, pieces: list, agent: str | None, keep: frozenset[str]) -> None:
        """Verify a fetched blob whole (its pieces in order), then keep it in the tier."""
        h = xxhash.xxh3_128()
        for piece in pieces:
            h.update(piece)
        if h.hexdigest() != blob_id:
            self._bad_remote.add(blob_id)
            who = f" (needed by agent {agent!r})" if agent else ""
            raise CorruptBlobError(
                f"blob {blob_id} is corrupt in {self.describe_location()}: its bytes no longer match its hash{who}",
                blob_id,
                agent,
            )
        try:
            self.tier.add(blob_id, pieces, keep)
        except OSError:
            pass

    def forget_local(self, blob_id: str) -> bool:
        self.tier.drop(blob_id)
        return blob_id not in self._bad_remote

    def exists(self, blob_id: str) -> bool:
        return self.stat(blob_id) is not None

    def missing(self, blob_ids: Iterable[str]) -> set[str]:
        ids = list(blob_ids)
        return {b for b, there in zip(ids, self._pool.map(self.exists, ids)) if not there}

    def stat(self, blob_id: str) -> tuple[int, float] | None:
        import obstore as obs
        import obstore.exceptions as oe

        try:
            meta = self._call(f"checking blob {blob_id}", obs.head, self.client, self.key(blob_id))
        except (FileNotFoundError, oe.NotFoundError):
            return None
        return int(meta["size"]), meta["last_modified"].timestamp()

    def hashes_to_name(self, blob_id: str, buf: bytearray) -> bool:
        try:
            data = self._get(blob_id)
        except MissingBlobError:
            raise FileNotFoundError(self.name_of(blob_id)) from None
        return xxhash.xxh3_128_hexdigest(memoryview(data)) == blob_id

    # -- listing and removal (gc, fsck) ----------------------------------------------------

    def iter_files(self) -> Iterator[tuple[str, ObjectEntry]]:
        import obstore as obs

        stream = self._list(obs.list, self.client, self.base + "/", chunk_size=1000)
        cut = len(self.base) + 1
        while True:
            batch = self._list(next, iter(stream), None)
            if batch is None:
                return
            for meta in batch:
                rel = meta["path"][cut:]  # "ab/cdef….safetensors"
                if len(rel) > 3 and rel[2] == "/" and rel.endswith(BLOB_SUFFIX):
                    yield (
                        rel[:2] + rel[3 : -len(BLOB_SUFFIX)],
                        ObjectEntry(meta["path"], int(meta["size"]), meta["last_modified"].timestamp()),
                    )

    def age(self, entry: ObjectEntry, now: float | None = None) -> float:
        return (now or time.time()) - entry.modified

    def size(self, entry: ObjectEntry) -> int:
        return entry.size

    def describe(self, entry: ObjectEntry) -> str:
        return f"s3://{self.loc.bucket}/{entry.key}"

    def remove(self, blob_id: str) -> int:
        return sum(self.remove_many([blob_id]))

    def remove_many(self, blob_ids: list[str]) -> list[int]:
        """DeleteObjects, up to 1,000 keys a request; sizes from HEADs made concurrently first."""
        import obstore as obs

        sizes = list(self._pool.map(self.stat, blob_ids))
        there = [(b, st[0]) for b, st in zip(blob_ids, sizes) if st is not None]
        for i in range(0, len(there), DELETE_BATCH):
            part = there[i : i + DELETE_BATCH]
            self._call("deleting blobs", obs.delete, self.client, [self.key(b) for b, _ in part])
            for b, _ in part:
                self.tier.drop(b)
        return [st[0] if st is not None else 0 for st in sizes]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def default_tier_dir(loc: S3Location) -> Path:
    """$KVSTORE_CACHE_DIR/blobs/<bucket and prefix's hash> (default ~/.cache/kvstore/blobs/…)."""
    root = os.environ.get("KVSTORE_CACHE_DIR") or Path.home() / ".cache" / "kvstore"
    tag = hashlib.sha256(f"{loc.endpoint or ''}|{loc.bucket}|{loc.prefix}".encode()).hexdigest()[:16]
    return Path(root) / "blobs" / f"{loc.bucket}-{tag}"
