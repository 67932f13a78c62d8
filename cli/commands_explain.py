"""`kvstore explain`: why a stored conversation's turns missed the cache, as the server's responses said."""

from __future__ import annotations

import click

from .context import StoreRef, pass_store
from .format import count, emit_json, fields, safe

SERVE_MARK = "kvstore_serve"  # a server conversation's part of its record (kvstore.server.retention.MARK)


def _misses(meta: dict) -> list[dict]:
    inner = (meta or {}).get("meta") if isinstance(meta, dict) else None
    mark = inner.get(SERVE_MARK) if isinstance(inner, dict) else None
    misses = mark.get("misses") if isinstance(mark, dict) else None
    return [m for m in misses or [] if isinstance(m, dict)]


@click.command()
@click.argument("conversation")
@click.option(
    "--turn", type=click.IntRange(1), metavar="N", help="The turn to explain (1 is the first; default: the last)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_store
def explain(ref: StoreRef, conversation: str, turn: int | None, as_json: bool) -> None:
    """Why a conversation's prompt was not all cached: the first position that differs from the longest
    stored prefix, the segment it falls in, the text around it, and a reason code (as in the usage field
    of the server's response for that turn)."""
    from kvstore.server.reasons import REASONS

    info = ref.reader().agent(conversation)
    misses = _misses(info.meta)
    if not misses:
        raise click.ClickException(
            f"{conversation!r} has no recorded miss explanations: only kvstore serve records them, per turn"
        )
    if turn is None:
        miss = misses[-1]
    else:
        found = [m for m in misses if m.get("turn") == turn]
        if not found:
            kept = f"{misses[0].get('turn')}-{misses[-1].get('turn')}"
            raise click.ClickException(f"{conversation!r} has no recorded turn {turn} (the record keeps turns {kept})")
        miss = found[0]
    if as_json:
        emit_json(dict(miss, conversation=conversation))
        return
    reason = str(miss.get("reason"))
    rows = [
        ("conversation", conversation),
        ("turn", f"{miss.get('turn')} (recorded turns {misses[0].get('turn')}-{misses[-1].get('turn')})"),
        ("not cached", f"{count(int(miss.get('uncached_tokens') or 0))} tokens"),
        ("reason", f"{reason}: {REASONS.get(reason, '?')}"),
    ]
    if miss.get("position") is not None:
        rows.append(("position", f"token {count(int(miss['position']))}, in {miss.get('segment')}"))
        rows.append(("context", safe(str(miss.get("context", "")))))
    if miss.get("stored_context"):
        rows.append(("stored had", safe(str(miss["stored_context"]))))
    for key in ("evicted_by", "conversation_was", "other_model", "stored_in"):
        if miss.get(key):
            rows.append((key.replace("_", " "), safe(str(miss[key]))))
    click.echo(fields(rows))


COMMANDS = [explain]
