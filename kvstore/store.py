"""`kvstore.open()` and the `Store`: the public face of the engine."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from kvstore import store_open
from kvstore.blob.backend import BlobBackend
from kvstore.blob.iopool import IoPool
from kvstore.blob.local import BlobStore
from kvstore.cache.fingerprint import fingerprint
from kvstore.cache.recent_tokens import RecentTokens
from kvstore.errors import (
    AgentExistsError,
    IncompatibleStoreError,
    ReadOnlyStoreError,
    UnknownAgentError,
)
from kvstore.formats import FORMAT_VERSION, HASH_NAME, new_chunk_size
from kvstore.index import db, queries, removals, sizes
from kvstore.index.layers import WholeSeen
from kvstore.names import validate_name
from kvstore.ops import reserve
from kvstore.records import Match, Snapshot
from kvstore.store_reads import StoreReads

Progress = Callable[[int, int], None] | None


def _fingerprint_of(model: Any) -> str:
    """The model fingerprint from a fingerprint string, a model directory, or a loaded model."""
    if isinstance(model, str) and len(model) == 32 and all(c in "0123456789abcdef" for c in model):
        return model
    if model is None or isinstance(model, (bool, int, float, bytes)):
        raise TypeError(
            f"model= must be a fingerprint (kvstore.fingerprint(...)), a model path or a model, not {model!r}"
        )
    return fingerprint(model)


class Store(StoreReads):
    """A kvstore store: an index (SQLite file or database URL) and a folder of blobs.

    Use it as a context manager, or call `close()`. The read-only listings (`agents()`, `agent()`,
    `snapshots()`, `agent_bytes()`, `stats()`) are StoreReads' (kvstore.store_reads), shared with the CLI's
    StoreReader.
    """

    def __init__(
        self,
        url: str,
        root: Path,
        chunk_size: int | None,
        durable: bool,
        timeout: float,
        readonly: bool,
        io_threads: int,
        blobs: BlobBackend | None = None,
    ):
        self.url = url
        self.path = root
        self.readonly = readonly
        self.io_threads = io_threads
        self.io = IoPool(io_threads)
        self.whole_seen = WholeSeen()  # chunks this process found whole: a turn's save looks up only its new ones
        self.window_warned: set[str] = set()  # models a save warned about lost window chunks (ops.save)
        self.recent_tokens = RecentTokens()  # each agent's last saved token list: a turn converts only its new ids
        self.blobs: BlobBackend = blobs or BlobStore(root, durable=durable)
        try:
            self.engine = db.make_engine(url, timeout=timeout, readonly=readonly)
        except BaseException:
            self.blobs.close()
            raise
        try:
            size = new_chunk_size(chunk_size)
            # A new index gets its settings in the very transaction that creates it: a crash between
            # the two would leave a store that the next open fills with defaults (crash suite found it).
            self.schema_revision = db.ensure_schema(
                self.engine,
                readonly=readonly,
                initial_meta={"format_version": FORMAT_VERSION, "chunk_size": size, "hash": HASH_NAME},
            )
            self.chunk_size = self._settings(chunk_size)
        except BaseException:
            self.engine.dispose()
            self.blobs.close()
            raise

    def _settings(self, chunk_size: int | None) -> int:
        with db.transaction(self.engine, write=False, what="reading store settings") as conn:
            meta = db.read_meta(conn)
        if not meta.keys() - {removals.KEY}:  # (an index upgraded to 0004 before it had settings has the token)
            if self.readonly:
                raise ReadOnlyStoreError(f"{self.url} is an empty index on a read-only store")
            size = new_chunk_size(chunk_size)
            with db.transaction(self.engine, write=True, what="initialising the store") as conn:
                if not db.read_meta(conn).keys() - {removals.KEY}:  # another process may have won the race
                    db.write_meta(conn, {"format_version": FORMAT_VERSION, "chunk_size": size, "hash": HASH_NAME})
                meta = db.read_meta(conn)
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise IncompatibleStoreError(
                f"the store at {self.path} uses blob format {meta['format_version']}; this kvstore reads up to "
                f"{FORMAT_VERSION}: upgrade kvstore (pip install -U kvstore)"
            )
        if meta.get("hash") != HASH_NAME:
            raise IncompatibleStoreError(f"the store hashes with {meta.get('hash')!r}; this kvstore uses {HASH_NAME}")
        stored = int(meta["chunk_size"])
        if chunk_size is not None and chunk_size != stored:
            raise IncompatibleStoreError(
                f"the store at {self.path} was created with chunk size {stored}, not {chunk_size}: "
                "open it without chunk_size, or create a new store for another chunk size"
            )
        return stored

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self.io.close()
        self.blobs.close()
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kvstore.Store {self.url} chunk_size={self.chunk_size}>"

    @property
    def shown_url(self) -> str:
        """The index URL, password hidden (`Stats.url`)."""
        return self.engine.url.render_as_string(hide_password=True)

    def reading(self, what: str) -> contextlib.AbstractContextManager[db.SqlAlchemyReads]:
        """A read transaction for the plain SQL of kvstore.index.reads (StoreReads, ops.accounting)."""
        return db.reading(self.engine, what)

    def _writable(self) -> None:
        if self.readonly:
            raise ReadOnlyStoreError(f"the store at {self.path} is read-only: loads work, saves do not")

    # -- the cache API ---------------------------------------------------------------------

    def save(
        self,
        name: str,
        cache: list,
        tokens: Any,
        *,
        model: Any,
        meta: dict | None = None,
        label: str | None = None,
        pinned: bool = False,
        captured: dict | None = None,
        moves_from: Sequence[str] = (),
    ) -> Snapshot:
        """Save `cache` (mlx-lm cache list that has seen exactly `tokens`) as agent `name`'s new head.

        Args:
            name: the agent; created on first save.
            cache: the model's cache list (e.g. from `make_prompt_cache`), positioned at len(tokens).
            tokens: the token ids the cache holds, in order.
            model: the model fingerprint (`kvstore.fingerprint(...)`), a model path, or a loaded model.
            meta: JSON-able agent metadata (role, messages, ...); None keeps what is stored.
            label: names the snapshot; labelled and pinned snapshots survive gc's retention.
            captured: pieces captured during prefill (sliding-window layers; see kvstore.agents).
            moves_from: model fingerprints the agent may belong to now; the save moves it to `model`
                (an agent manager's kv_bits cache stored under another fingerprint once quantized).

        Only chunks the store lacks are written. Returns the new Snapshot.
        """
        self._writable()
        from kvstore.ops import save  # (here, not at the top: read-only commands start without MLX)

        return save.save(
            self,
            name,
            cache,
            tokens,
            model=_fingerprint_of(model),
            meta=meta,
            label=label,
            pinned=pinned,
            captured=captured,
            moves_from=tuple(moves_from),
        )

    def load(self, name: str, *, model: Any = None, snapshot: int | None = None) -> tuple[list, list[int]]:
        """(cache, tokens) of the agent's head snapshot (or `snapshot`), checked blob by blob."""
        validate_name(name)
        from kvstore.ops import restore

        return restore.load(self, name, None if model is None else _fingerprint_of(model), snapshot)

    def match(self, tokens: Any, *, model: Any) -> Match:
        """The longest prefix of `tokens` that the store can restore for `model` (from any agent)."""
        from kvstore.ops import restore

        return restore.match(self, tokens, _fingerprint_of(model))[0]

    def restore(self, tokens: Any, *, model: Any, max_tokens: int | None = None) -> tuple[list | None, int]:
        """(cache, n): the longest stored prefix of `tokens` as a ready cache, or (None, 0)."""
        from kvstore.ops import restore

        return restore.restore(self, tokens, _fingerprint_of(model), max_tokens)

    # -- agents ----------------------------------------------------------------------------

    def delete(self, name: str) -> bool:
        """Forget an agent and its snapshots (their blobs go at the next gc). False if it did not exist."""
        validate_name(name)
        self._writable()

        def drop() -> bool:
            with db.transaction(self.engine, write=True, what=f"deleting agent {name!r}") as conn:
                return queries.delete_agent(conn, name)

        return reserve.freeing(drop, root=self.path, engine=self.engine)  # a way out of a full disk: works on one

    def fork(self, name: str, new_name: str) -> Snapshot:
        """A new agent whose head is a copy of `name`'s head: it shares every chunk, no blob is copied."""
        validate_name(name)
        validate_name(new_name)
        self._writable()
        import numpy as np

        from kvstore.index import commit
        from kvstore.ops import restore

        now = db.now()
        with db.transaction(self.engine, write=True, what=f"forking {name!r}") as conn:
            src = restore.head_snapshot(conn, name)
            if queries.agent_row(conn, new_name) is not None:
                raise AgentExistsError(f"an agent named {new_name!r} already exists")
            keys = queries.snapshot_keys(conn, src.id)
            chain = commit.Chain(
                model=commit.ModelEntry(fingerprint=src.fingerprint, layout=src.layout),
                agent=commit.AgentEntry(name=new_name, meta_json=src.meta, created=now, updated=now, new=True),
                snapshots=[commit.NewSnapshot(tokens=np.frombuffer(src.tokens, dtype="<u4"), keys=keys, created=now)],
                head=0,
            )
            (new_snap,) = commit.commit_chain(conn, chain, chunk_size=self.chunk_size, now=now)
        return Snapshot(
            id=new_snap,
            agent=new_name,
            model=src.fingerprint,
            n_tokens=src.n_tokens,
            created=now,
            blobs_reused=len(keys),
        )

    def set_meta(self, name: str, meta: dict) -> None:
        """Replace an agent's metadata (its record: role, messages, ...)."""
        validate_name(name)
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, not {type(meta).__name__}")
        self._writable()
        with db.transaction(self.engine, write=True, what=f"updating agent {name!r}") as conn:
            n = queries.update_agent_meta(conn, name, meta, db.now())
        if not n:
            raise UnknownAgentError(f"no agent named {name!r} in this store")

    def tokens(self, name: str, *, snapshot: int | None = None) -> list[int]:
        """The exact token ids of an agent's head snapshot (or `snapshot`): primary data, no blob is read."""
        validate_name(name)
        from kvstore.ops import restore

        with db.transaction(self.engine, write=False, what=f"reading agent {name!r}'s tokens") as conn:
            row = restore.head_snapshot(conn, name, snapshot)
        return restore.tokens_from_bytes(row.tokens)

    # agent(), agents(), snapshots(), agent_bytes() and stats() are inherited from StoreReads.

    # -- whole-store operations ------------------------------------------------------------

    def fsck(self, *, repair: bool = False, grace: float = 3600.0, progress: Progress = None):
        """Re-hash every blob and check every reference both ways; `repair=True` fixes what it can."""
        from kvstore.ops.fsck import fsck

        if repair:
            self._writable()
        return fsck(self, repair=repair, grace=grace, progress=progress)

    def gc(
        self,
        *,
        dry_run: bool = False,
        keep_last: int = 1,
        grace: float = 3600.0,
        progress: Progress = None,
        agents: Iterable[str] | None = None,
    ):
        """Drop snapshots past the retention policy, then chunks and blobs nothing retained needs.

        Keeps each agent's last `keep_last` snapshots (and its head, and labelled or pinned ones);
        given `agents`, the policy applies to those agents only and every other agent keeps all its
        snapshots. Blob files no row names are removed only once older than `grace` seconds (a save
        may be writing them).
        """
        from kvstore.ops.gc import gc

        if not dry_run:
            self._writable()
        return gc(self, dry_run=dry_run, keep_last=keep_last, grace=grace, progress=progress, agents=agents)

    def discard_blob(self, blob_id: str) -> int:
        """Forget a damaged blob: its file and every index row naming it. Returns the rows removed.

        The snapshots that used it keep their tokens; a later save (or the agent manager's recovery)
        writes the KV again.
        """
        self._writable()
        self.blobs.check_id(blob_id)  # InvalidBlobIdError for anything but a blob id, before any row goes
        with db.transaction(self.engine, write=True, what=f"discarding blob {blob_id}") as conn:
            n, keys = queries.drop_blob_rows(conn, blob_id)
            sizes.refresh(conn, keys)
            self.blobs.remove(blob_id)  # under the write lock, after the rows are gone
        return n


def open(
    path_or_url: str | os.PathLike | None = None,
    *,
    index: str | os.PathLike | None = None,
    blobs: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_size: int | str | None = None,
    chunk_size: int | None = None,
    durable: bool = True,
    timeout: float = 30.0,
    readonly: bool | None = None,
    create: bool = True,
    io_threads: int = 4,
) -> Store:
    """Open (or create) a store.

    Args:
        path_or_url: a folder (default $KVSTORE_HOME or ~/.kvstore), or a SQLAlchemy URL such as
            "postgresql+psycopg://user@host/db" (then `blobs` names where the blobs are).
        index: the same as path_or_url (reads better beside blobs=).
        blobs: for a URL store, the blob folder (shared storage), or an S3-compatible bucket:
            "s3://bucket/prefix?endpoint=http://host:port" (credentials: the AWS variables or a profile).
            Default $KVSTORE_BLOBS.
        cache_dir, cache_size: an S3 store's local disk tier (default $KVSTORE_CACHE_DIR/blobs/…, and
            $KVSTORE_CACHE_SIZE or 10 GiB; sizes as bytes or "512M", "10G").
        chunk_size: tokens per chunk for a new store (default 256); an existing store keeps its own.
        durable: fsync blobs and directories before committing (turn off only for scratch stores).
        timeout: seconds to wait for another writer before StoreLockedError.
        readonly: open without writing anything; None: read-only when the folder is not writable.
        create: create the store if it does not exist (else NotAStoreError).
    """
    where = store_open.locate(path_or_url, index=index, blobs=blobs)
    if where.in_s3:
        made = store_open.s3_store(where, cache_dir=cache_dir, cache_size=cache_size, readonly=readonly)
    else:
        made = store_open.folder_store(where, create=create, readonly=readonly, durable=durable)
    return Store(made.url, made.root, chunk_size, durable, timeout, made.readonly, io_threads, blobs=made.blobs)
