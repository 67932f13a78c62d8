"""What one server process holds: the model thread, the agent manager, the conversations, the budget."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import Request

import kvstore
from kvstore.errors import InvalidNameError, ModelMismatchError, StoreError, UnknownAgentError

from .config import ServerConfig
from .errors import RequestError
from .request_log import PrefillProgress, track_job
from .scheduler import Scheduler
from .worker import Job

log = logging.getLogger("kvstore.server")


def context_length(handle: Any) -> int | None:
    """The model's context window from its config (max_position_embeddings and its aliases)."""
    config: dict = {}
    if handle.path is not None and (Path(handle.path) / "config.json").is_file():
        config = json.loads((Path(handle.path) / "config.json").read_text())
    args = getattr(handle.model, "args", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key, getattr(args, key, None))
        if isinstance(value, int) and value > 0:
            return value
    return None


def as_request_error(e: BaseException) -> RequestError:
    """An exception from a turn as the error a client gets (the model thread keeps serving)."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, (ValueError, ModelMismatchError, UnknownAgentError, InvalidNameError, ConnectionAbortedError)):
        return RequestError(400, str(e))
    if isinstance(e, StoreError):
        return RequestError(500, f"store error: {e}")
    log.error("request failed: %s: %s", type(e).__name__, e, exc_info=e)
    return RequestError(500, f"internal error ({type(e).__name__}): {e}")


class ServerState:
    """Loads the model and opens the store on the model thread; closes both on shutdown."""

    def __init__(self, config: ServerConfig):
        config.check()
        self.config = config
        self.started = time.time()
        self.stopping = False  # set on Ctrl-C / SIGTERM: turns stopped then are not "the client went away"
        self.worker = Scheduler(config.max_concurrency)
        try:
            self.worker.call(self._open)
        except BaseException:
            self.worker.stop()
            raise

    def _open(self) -> None:
        from kvstore.agents import AgentManager

        from .budget import DiskBudget, default_max_disk
        from .conversations import Conversations

        c = self.config
        self.store = kvstore.open(c.store, blobs=c.blobs, chunk_size=c.chunk_size)
        try:
            self.manager = AgentManager(
                c.model,
                self.store,
                max_resident=c.max_resident,
                max_resident_bytes=c.max_resident_bytes,
                share_resident=True,
                progress=PrefillProgress(c.progress_seconds),
                kv_bits=c.kv_bits,
                kv_group_size=c.kv_group_size,
                quantized_kv_start=c.quantized_kv_start,
            )
        except BaseException:
            self.store.close()
            raise
        handle = self.manager.handle
        self.tokenizer = handle.tokenizer
        self.context_length = c.context_length or context_length(handle)
        self.model_id = c.model_id or (str(c.model) if isinstance(c.model, str) else handle.name)
        names = {self.model_id, handle.name}
        if handle.path is not None:
            names |= {str(handle.path), Path(handle.path).name}
        self.aliases = [a for a in dict.fromkeys(c.aliases) if a != self.model_id]
        self.model_names = names | set(self.aliases)
        max_disk = default_max_disk(shutil.disk_usage(self.store.path).free) if c.max_disk == "auto" else c.max_disk
        assert not isinstance(max_disk, str), f"--max-disk {max_disk!r}: a size, auto or none"
        self.budget = DiskBudget(
            self.store,
            self.manager,
            max_disk,
            c.min_free_disk,
            anon_ttl=c.anon_ttl,
            namespace_quota=c.namespace_quota,
            max_writes_per_day=c.max_writes_per_day,
        )
        self.conversations = Conversations(self.manager, self.budget)
        self.worker.attach(self.conversations)
        if not self.budget.check_floor():
            self.budget.enforce(force=True)
        log.info(
            "serving %s (%s) from the store at %s; context %s tokens; disk budget %s",
            self.model_id,
            self.manager.fingerprint[:12],
            self.store.path,
            self.context_length,
            "off" if max_disk is None else f"{max_disk} bytes",
        )

    def close(self) -> None:
        """Stop generating, finish the current save, save what is unsaved, close the store."""
        self.stopping = True
        self.worker.cancel_all()
        try:
            self.worker.call(self._close)
        finally:
            self.worker.stop()

    def _close(self) -> None:
        try:
            self.manager.close()
        finally:
            self.store.close()
        log.info("saved and closed the store")

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise RequestError(
                404,
                f"the model {name!r} does not exist here: this server runs {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def submit_turn(self, turn) -> Job:
        """A chat turn for the scheduler: generated together with the other requests' turns."""
        job = self.worker.submit_turn(turn, asyncio.get_running_loop())
        track_job(job)  # the request's log line and metrics read its result
        return job

    def submit(self, fn) -> Job:
        job = self.worker.submit(fn, asyncio.get_running_loop())
        track_job(job)  # the request's log line and metrics read its result
        return job

    async def result(self, job: Job, request: Request) -> Any:
        """Wait for a job; a client that goes away meanwhile stops its generation (what was computed is saved)."""
        fut = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=1.0)
            if done:
                try:
                    return fut.result()
                except Exception as e:
                    raise as_request_error(e) from None
            if not job.cancelled.is_set() and await request.is_disconnected():
                job.cancel()

    async def call(self, fn, request: Request) -> Any:
        """Run fn() on the model thread in turn with the generations (lookups, stats, clearing)."""
        return await self.result(self.submit(lambda job: fn()), request)
