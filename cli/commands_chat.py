"""`kvstore chat AGENT [MESSAGE|-]`: talk to an agent from the terminal; replies stream, every turn is saved."""

from __future__ import annotations

import signal
import sys
import threading

import click

from kvstore.errors import UnknownAgentError
from kvstore.records import AgentRecord

from .context import CliError, StoreRef, pass_store
from .format import count

# The agent's record remembers the model it was created with (the name given to --model), so the
# next `kvstore chat AGENT ...` finds it without --model.
MODEL_KEY = "model"
DEFAULT_MODEL = "smollm2-135m-instruct"  # the demo's model; `kvstore models fetch` gets it once


def _load_model(name: str):
    """The agent manager's model for a --model value: 'builtin' (the offline model), a folder, an id or a name."""
    from kvstore.agents import resolve_model

    return resolve_model(name)  # "builtin[:ARCH-SIZE]" too


def stats_line(agent: str, reply) -> str:
    """Where the prompt came from and how fast the reply was, for stderr after a reply."""
    s = reply.stats
    return (
        f"[{agent}: {count(s.prompt_tokens)} prompt tokens: {count(s.reused_tokens + s.restored_tokens)} "
        f"from the cache, {count(s.prefilled_tokens)} prefilled; first token after "
        f"{s.ttft * 1000:.0f} ms; {count(s.generated_tokens)} tokens at {s.tokens_per_second:.1f}/s]"
    )


def stream_reply(bot, message: str, options: dict, stats: bool):
    """Send `message`, print the reply as it streams, then the stats line; returns the Reply.

    Ctrl-C stops the reply at its next token: the turn keeps and saves what was generated, then
    KeyboardInterrupt is raised (the caller decides what it means). A KeyboardInterrupt raised inside
    the model would leave its cache unusable, so the signal only sets a flag; a second Ctrl-C
    interrupts at once (during a long prefill), and that turn is not saved.
    """
    stopped = False

    def on_sigint(signum, frame):
        nonlocal stopped
        if stopped:
            raise KeyboardInterrupt
        stopped = True

    main_thread = threading.current_thread() is threading.main_thread()  # (only it may set signal handlers)
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        stream = bot.chat(message, stream=True, **options)
        for piece in stream:
            click.echo(piece, nl=False)
            if stopped:
                stream.close()  # the turn keeps (and saves) what was generated
                break
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    click.echo()
    reply = stream.reply
    if stats and reply is not None:
        click.echo(stats_line(bot.name, reply), err=True)
    if stopped:
        raise KeyboardInterrupt
    return reply


def open_agent(ref: StoreRef, agent: str, model_name: str | None, system_prompt: str | None):
    """(AgentManager, Agent) for AGENT: the stored one with its recorded model, or a new one."""
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
        model_name = model_name or DEFAULT_MODEL
    else:
        if system_prompt is not None:
            raise CliError(f"agent {agent!r} already exists: --system only applies when creating an agent")
        record = AgentRecord.parse(info.meta)
        stored_model = record.meta.get(MODEL_KEY) if record.by_manager else None
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
    except BaseException:
        mgr.close()
        raise
    return mgr, bot, model_name


@click.command()
@click.argument("agent")
@click.argument("message", required=False)
@click.option(
    "--model",
    "model_name",
    metavar="MODEL",
    help=f"The model of a new AGENT: a name `kvstore models` lists (default: {DEFAULT_MODEL}, fetched once), "
    "`builtin` (offline, random weights), a model folder or a Hugging Face id. "
    "An existing agent uses the model it was created with.",
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
    help="After each reply, print on stderr where the prompt came from and how long it took (TTFT).",
)
@pass_store
def chat(
    ref: StoreRef,
    agent: str,
    message: str | None,
    model_name: str | None,
    system_prompt: str | None,
    max_tokens: int,
    temp: float,
    top_p: float,
    seed: int | None,
    stats: bool,
) -> None:
    """Talk to AGENT: send MESSAGE and stream the reply, or, without MESSAGE, chat interactively.

    MESSAGE `-` reads the message from standard input. The interactive session keeps a readline
    history; a line `\"\"\"` starts and ends a multi-line message; /reset starts the conversation over,
    /save NAME keeps a copy of it as agent NAME, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply.

    A new AGENT uses --model (default smollm2-135m-instruct) and --system; the store is created if it
    does not exist. The next `kvstore chat AGENT`, in any process, restores the agent's cache from the
    store and prefills only the new message.
    """
    if message == "-":
        message = sys.stdin.read().rstrip("\n")
        if not message.strip():
            raise CliError("the message read from standard input is empty")
    mgr, bot, model_name = open_agent(ref, agent, model_name, system_prompt)
    options = dict(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
    try:
        if message is None:
            from .chat_session import ChatSession

            ChatSession(mgr, bot, model_name, options, stats).run()
        else:
            stream_reply(bot, message, options, stats)
    finally:
        mgr.close()


COMMANDS = [chat]
