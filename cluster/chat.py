"""`strata chat`: a chat in the terminal, streaming each answer as its tokens arrive.

    strata chat [MODEL] [--url URL] [--api-key KEY] [--system TEXT] [--temperature T] [--max-tokens N]
                [--config FILE]

With --url it talks to any OpenAI-compatible server (MODEL, or the server's first model in /v1/models). Without
it, it starts `strata serve MODEL` on a spare local port, waits until the model is ready, and stops the server
when the chat ends, as `ollama run` does. The conversation is kept until /reset; /system TEXT sets the system
prompt, /exit (or Ctrl-D, or Ctrl-C at the prompt) leaves, Ctrl-C during an answer stops that answer.
Errors (server unreachable, API key refused, model unknown) are one line.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from cluster.api_client import ServerError, error_message, openai_client, pick_model
from cluster.config import DEFAULT_MODEL

PROMPT = ">>> "
SERVER_READY = "Strata is serving"
HELP = ("/reset: forget the conversation   /system TEXT: set the system prompt (/system alone shows it)\n"
        "/exit: leave (also Ctrl-D)   Ctrl-C: stop the answer being written, or leave at the prompt")


class Conversation:
    """The messages so far, and one streamed answer at a time."""

    def __init__(self, client, model: str, system: str | None, sampling: dict):
        self.client, self.model, self.system, self.sampling = client, model, system, sampling
        self.turns: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def reset(self) -> None:
        self.turns.clear()

    def ask(self, text: str, write) -> None:
        """Stream the answer to `text` through `write`; a failed request leaves the conversation as it was."""
        import openai

        reply: list[str] = []
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=[*self.messages(), {"role": "user", "content": text}], stream=True,
                **self.sampling)
            with stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        reply.append(chunk.choices[0].delta.content)
                        write(reply[-1])
        except KeyboardInterrupt:  # the answer so far stays, as the user saw it
            write(" [stopped]")
        except openai.APIError as e:
            if reply:
                write("\n")
            raise ServerError(error_message(e, self.client.base_url)) from None
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}]
        write("\n")


@contextmanager
def local_server(model: str | None, config: str | None) -> Iterator[str]:
    """`strata serve MODEL` on a spare port, in its own session (Ctrl-C in the chat must not reach it); its console
    goes to a log file, kept (and named) only when it fails. Yields its base URL once the model is ready."""
    from cluster.serve_env import spare_port

    port = spare_port()
    fd, log_name = tempfile.mkstemp(prefix="strata-chat-", suffix=".log")
    log = Path(log_name)
    command = [sys.executable, "-m", "cluster.cli", "serve", *([model] if model else []), "--host", "127.0.0.1",
               "--port", str(port), *(["--config", config] if config else [])]
    what = model or (f"the models of {config}" if config else DEFAULT_MODEL)
    print(f"Starting a local server for {what} (the first start of a model takes longer)...", flush=True)
    with os.fdopen(fd, "w") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    keep_log = False
    try:
        while SERVER_READY not in log.read_text(errors="replace"):
            if process.poll() is not None:
                keep_log = True
                raise ServerError(f"the local server stopped: {last_line(log)} (its log: {log})")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # `strata serve` stops its app and its Ray cluster on SIGINT
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not keep_log:
            log.unlink(missing_ok=True)


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_chat(conversation: Conversation, server: str) -> None:
    """The prompt loop, until /exit, Ctrl-D or Ctrl-C at the prompt. Errors of one request are shown and the
    chat goes on."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    print(f"Chatting with {conversation.model} at {server}. /help for commands, /exit or Ctrl-D to leave.",
          flush=True)
    while True:
        try:
            line = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/bye", "/quit"):
            return
        if command == "/reset":
            conversation.reset()
            print("(conversation cleared)", flush=True)
        elif command == "/system":
            if rest.strip():
                conversation.system = rest.strip()
                print("(system prompt set)", flush=True)
            else:
                print(f"(system prompt: {conversation.system or 'none'})", flush=True)
        elif command in ("/help", "/?"):
            print(HELP, flush=True)
        elif command.startswith("/") and command[1:].isalpha():
            print(f"(unknown command {command}; /help lists them)", flush=True)
        else:
            try:
                conversation.ask(line, write)
            except ServerError as e:
                print(f"strata chat: {e}", file=sys.stderr, flush=True)


def chat_command(args) -> int:
    # SIGTERM and SIGHUP (the terminal closed) end the chat like Ctrl-C: a local server is stopped on the way out.
    # SIGINT too, where it came in ignored (started in the background of a non-interactive shell), so that Ctrl-C
    # in the chat's own terminal still stops an answer.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    sampling = {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens)) if v is not None}
    try:
        with nullcontext(args.url) if args.url else local_server(args.model, args.config) as url:
            client = openai_client(url, args.api_key)
            conversation = Conversation(client, pick_model(client, args.model), args.system, sampling)
            run_chat(conversation, url.rstrip("/"))
    except ServerError as e:
        print(f"strata chat: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while the local server starts
        print("", flush=True)
    return 0


def add_chat_parser(commands) -> None:
    chat_p = commands.add_parser("chat", help="Chat in the terminal with a served model (starts a local server "
                                              "unless --url is given).")
    chat_p.add_argument("model", nargs="?", help="Model to chat with: with --url, a served name (default: the "
                                                 "server's first); without, what `strata serve` takes (default: "
                                                 "smollm2-135m-instruct).")
    server = chat_p.add_mutually_exclusive_group()
    server.add_argument("--url", help="An OpenAI-compatible server, e.g. http://127.0.0.1:8000 (default: start one).")
    chat_p.add_argument("--api-key", help="Bearer key for the server (default: $OPENAI_API_KEY).")
    chat_p.add_argument("--system", help="System prompt.")
    chat_p.add_argument("--temperature", type=float, help="Sampling temperature (default: the server's).")
    chat_p.add_argument("--max-tokens", type=int, help="Longest answer, in tokens (default: the server's).")
    server.add_argument("--config", help="ClusterConfig YAML for the local server (without --url).")
    chat_p.set_defaults(run=chat_command)
