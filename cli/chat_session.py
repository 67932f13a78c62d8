"""The interactive `kvstore chat AGENT`: a prompt with readline history, multi-line messages and slash commands."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import click

from .commands_chat import stream_reply
from .format import count

HELP = (
    'Type a message and press Enter; a line """ starts a multi-line message and another ends it.\n'
    "/reset   start the conversation over (the system prompt stays)\n"
    "/save    save now; /save NAME also keeps a copy of the conversation as agent NAME\n"
    "/exit    leave (or Ctrl-D); Ctrl-C stops a reply, and at the prompt leaves"
)
FENCE = '"""'
PROMPT, MORE = ">>> ", "... "


def history_path() -> Path:
    """The readline history of interactive chats: $KVSTORE_CACHE_DIR or ~/.cache/kvstore, file chat_history."""
    root = os.environ.get("KVSTORE_CACHE_DIR") or Path.home() / ".cache" / "kvstore"
    return Path(root).expanduser() / "chat_history"


class ChatSession:
    """One interactive session with one agent; each turn is saved as it ends, as in a one-shot chat."""

    def __init__(self, manager, agent, model_name: str, options: dict, stats: bool):
        self.manager, self.agent, self.model_name = manager, agent, model_name
        self.options, self.stats = options, stats
        self._readline: Any = None  # the readline module once history is on

    def run(self) -> None:
        """Read messages until /exit or end of input; Ctrl-C at the prompt propagates (the command exits 130)."""
        self._start_history()
        # Ctrl-C means what HELP says even when we were started with SIGINT ignored (a background job of a
        # script): otherwise it would stop a reply (stream_reply sets its own handler) but not leave the prompt.
        owns_sigint = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.default_int_handler) if owns_sigint else None
        try:
            turns = len(self.agent.messages) // 2
            click.echo(
                f"Chatting with {self.agent.name} ({self.model_name}; {count(turns)} earlier turn(s), "
                f"{count(len(self.agent.tokens))} tokens cached). /help for commands, /exit or Ctrl-D to leave.",
                err=True,
            )
            while True:
                try:
                    text = self.read_message()
                except EOFError:
                    click.echo(err=True)
                    return
                if not text.strip():
                    continue
                if text.startswith("/") and not self.command(text.strip()):
                    return
                if not text.startswith("/"):
                    try:
                        stream_reply(self.agent, text, self.options, self.stats)
                    except KeyboardInterrupt:
                        click.echo("[stopped: the reply so far is kept]", err=True)
        finally:
            if owns_sigint:
                signal.signal(signal.SIGINT, previous)
            self._save_history()

    def read_message(self) -> str:
        """One message: a line, or the lines between two \"\"\" lines (or a line ending in a backslash, continued)."""
        line = input(PROMPT)
        if line.strip() == FENCE:
            lines = []
            while (more := input(MORE)).strip() != FENCE:
                lines.append(more)
            return "\n".join(lines)
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input(MORE))
        return "\n".join(lines)

    def command(self, text: str) -> bool:
        """Run a slash command; False to leave."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            click.echo(HELP, err=True)
        elif name == "/reset":
            self.agent.messages = []  # the next prompt is the system prompt and the new message:
            click.echo("[a new conversation: the system prompt's cache is kept]", err=True)  # its prefix is reused
        elif name == "/save":
            snap = self.agent.save()
            where = f" (snapshot {snap.id})" if snap is not None else ""
            click.echo(f"[saved {self.agent.name}: {count(len(self.agent.tokens))} tokens{where}]", err=True)
            if arg:
                self.manager.fork(self.agent.name, arg)
                click.echo(f"[kept a copy as agent {arg}: `kvstore chat {arg}` continues it]", err=True)
        else:
            click.echo(f"unknown command {name}: /help lists them", err=True)
        return True

    def _start_history(self) -> None:
        try:
            import readline
        except ImportError:  # (Windows without pyreadline): input() still works, without history
            return
        self._readline = readline
        readline.set_history_length(1000)
        try:
            readline.read_history_file(history_path())
        except OSError:
            pass

    def _save_history(self) -> None:
        if self._readline is None:
            return
        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(path)
        except OSError:
            pass
