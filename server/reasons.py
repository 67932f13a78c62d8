"""The reason codes of a miss explanation (usage.kvstore.miss.reason, `kvstore explain`), and what each means.

Light on purpose: the CLI reads it without importing the server.
"""

from __future__ import annotations

__all__ = ["REASONS"]

REASONS = {
    "none": "every prompt token but the last came from a cache (the last one is always computed)",
    "new_content": "the prompt goes on with tokens no conversation of this model has had",
    "evicted": "a conversation that had these tokens was dropped (evicted_by: budget, anon_ttl, "
    "namespace_quota, cleared, deleted)",
    "other_model": "another model (or other weights) has these tokens stored: caches never cross models",
    "template_changed": "a conversation had these same messages, but the chat template (or tools, or template "
    "arguments) now renders them as other tokens",
    "chunk_granularity": "a stored prefix goes further, but the store restores whole chunks of --chunk-size "
    "tokens and the prompt leaves it inside a chunk",
    "hybrid_boundary": "a stored prefix goes further, but a recurrent (hybrid) model's state restores only at "
    "a checkpoint, and the nearest one lies before this position",
    "unrestorable": "a stored prefix goes further, but its KV could not be rebuilt there (a sliding window "
    "already rotated, or damaged blobs)",
}
