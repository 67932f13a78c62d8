"""kvstore.agents: persistent chat agents on mlx-lm whose KV caches live in a kvstore store.

    import kvstore
    from kvstore.agents import AgentManager

    store = kvstore.open()
    mgr = AgentManager("path/to/model", store, max_resident=3)
    tech = mgr.create("tech", system_prompt="You are a technical specialist.")
    reply = tech.chat("What failed?", max_tokens=200)   # reply.text, reply.stats (reused/restored/prefilled, ttft)
    mgr.save_all()                                      # autosave is on by default; this flushes the rest
    # ... a new process:
    tech = AgentManager("path/to/model", kvstore.open()).get("tech")
    tech.chat("And how do we fix it?")                  # restores the cache instead of prefilling it

Agents that share a prompt prefix (a system prompt, a document) share its stored chunks: a new
agent restores the prefix from the store rather than prefilling it.
"""

from .agent import Agent, ReplyStream
from .manager import AgentManager, RecoveryWarning
from .model import ModelHandle, ModelLoadError, resolve_model
from .records import GenerationOptions, MemoryReport, Reply, TurnStats
from .team import Consultation, consult

__all__ = [
    "AgentManager",
    "Agent",
    "Reply",
    "TurnStats",
    "ReplyStream",
    "MemoryReport",
    "GenerationOptions",
    "consult",
    "Consultation",
    "RecoveryWarning",
    "ModelHandle",
    "ModelLoadError",
    "resolve_model",
]
