"""`kvstore chat AGENT MESSAGE`: talk to an agent from the terminal; the reply streams, the turn is saved."""

from __future__ import annotations

import click

from kvstore.errors import UnknownAgentError

from .format import count
from .main import CliError, StoreRef, pass_store

# The agent's record remembers the model it was created with (the name given to --model), so the
# next `kvstore chat AGENT ...` finds it without --model.
MODEL_KEY = "model"


def _load_model(name: str):
    """The agent manager's model for a --model value: 'builtin' (the offline model), a folder or an id."""
    from kvstore.agents import resolve_model

    return resolve_model(name)  # "builtin[:ARCH-SIZE]" too


@click.command()
@click.argument("agent")
@click.argument("message")
@click.option(
    "--model",
    "model_name",
    metavar="MODEL",
    help="The model: `builtin` (offline, random weights), a model folder or a Hugging Face id. "
    "Needed to create AGENT; an existing agent uses the model it was created with.",
)
@click.option("--system", "system_prompt", metavar="TEXT", help="The system prompt of a new AGENT.")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="At most this many tokens in the reply.",
)
@click.option(
    "--temp", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Sampling temperature (0: greedy)."
)
@click.option("--top-p", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Nucleus sampling (0: off).")
@click.option("--seed", type=int, help="Seed for repeatable sampling.")
@click.option(
    "--stats/--no-stats",
    default=True,
    show_default=True,
    help="After the reply, print on stderr where the prompt came from and how long it took.",
)
@pass_store
def chat(
    ref: StoreRef,
    agent: str,
    message: str,
    model_name: str | None,
    system_prompt: str | None,
    max_tokens: int,
    temp: float,
    top_p: float,
    seed: int | None,
    stats: bool,
) -> None:
    """Send MESSAGE to AGENT and stream its reply; the turn is saved to the store.

    A new AGENT needs --model (and usually --system); the store is created if it does not exist.
    The next `kvstore chat AGENT ...`, in any process, restores the agent's cache from the store
    and prefills only the new message.
    """
    import sys

    import kvstore

    if "mlx.core" not in sys.modules:  # (in a process that already runs MLX, it is too late to choose)
        kvstore.use_openblas()  # before anything imports mlx.core: ~25x faster fp32 matmuls on Linux CPUs
    from kvstore.agents import AgentManager

    store = ref.get(create=True)
    try:
        info = store.agent(agent)
    except UnknownAgentError:
        info = None
    if info is None:
        if model_name is None:
            raise CliError(
                f"no agent named {agent!r} in {store.path}: create it with --model MODEL "
                "(`builtin`, a model folder or a Hugging Face id) and --system TEXT"
            )
    else:
        if system_prompt is not None:
            raise CliError(f"agent {agent!r} already exists: --system only applies when creating an agent")
        record = info.meta if isinstance(info.meta, dict) else {}
        stored_model = (record.get("meta") or {}).get(MODEL_KEY) if "kvstore_agent" in record else None
        model_name = model_name or stored_model
        if model_name is None:
            raise CliError(
                f"agent {agent!r} does not record its model (it was not made by `kvstore chat`): pass --model MODEL"
            )
    mgr = AgentManager(_load_model(model_name), store, max_resident=1)
    try:
        if info is None:
            bot = mgr.create(agent, system_prompt=system_prompt, meta={MODEL_KEY: model_name})
        else:
            bot = mgr.get(agent)
        stream = bot.chat(message, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, stream=True)
        for piece in stream:
            click.echo(piece, nl=False)
        click.echo()
        reply = stream.reply
        if stats and reply is not None:
            s = reply.stats
            click.echo(
                f"[{agent}: {count(s.prompt_tokens)} prompt tokens: {count(s.reused_tokens + s.restored_tokens)} "
                f"from the cache, {count(s.prefilled_tokens)} prefilled; first token after "
                f"{s.ttft * 1000:.0f} ms; {count(s.generated_tokens)} tokens at {s.tokens_per_second:.1f}/s]",
                err=True,
            )
    finally:
        mgr.close()


COMMANDS = [chat]
