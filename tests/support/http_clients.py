"""Clients of the OpenAI API that record how each request ended, as the client saw it: one completion, a long
stream in the background, and steady load from several threads."""
from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from tests.support.prompts import TEXTS


@dataclass
class Outcome:
    """How one request ended, as the client saw it."""

    stream: bool
    start: float
    end: float = 0.0
    status: int | None = None  # None: no HTTP answer (connection failed or timed out)
    chunks: int = 0  # stream chunks that carried text or a finish reason
    text: str = ""  # the first choice's text, whole or streamed
    error: dict | str | None = None  # the error event / error body / transport exception
    done: bool = False  # the stream ended with `data: [DONE]`
    closed: bool = False  # the client left the stream before its end
    replica: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and (self.done or not self.stream)


def completion(base_url: str, body: dict, headers: dict | None = None, timeout: float = 60.0,
               on_chunk: Callable[[Outcome], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> Outcome:
    """POST /v1/completions (streamed when body says so), reading it to the end, or until `should_stop()` holds
    after a chunk (the client then closes the stream)."""
    out = Outcome(stream=bool(body.get("stream")), start=time.monotonic())
    try:
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=headers, timeout=timeout) as r:
            out.status, out.replica = r.status_code, r.headers.get("x-strata-replica")
            if r.status_code != 200 or not out.stream:
                r.read()
                try:
                    data = r.json()
                except ValueError:  # not the API's JSON: a load balancer's own error page
                    data = {"error": r.text[:200]}
                out.error = data.get("error") if r.status_code != 200 else None
                out.text = data["choices"][0]["text"] if r.status_code == 200 else ""
            else:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line.removeprefix("data: ")
                    if payload == "[DONE]":
                        out.done = True
                        continue
                    event = json.loads(payload)
                    if "error" in event:
                        out.error = event["error"]
                    elif event.get("choices") and (event["choices"][0].get("text")
                                                   or event["choices"][0].get("finish_reason")):
                        out.chunks += 1
                        out.text += event["choices"][0].get("text") or ""
                        if on_chunk is not None:
                            on_chunk(out)
                        if should_stop is not None and should_stop():
                            out.closed = True
                            break
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.end = time.monotonic()
    return out


class LongStream(threading.Thread):
    """A long stream in the background; `replica` is set once its first token arrived, `outcome` once it ended
    (by itself, or by `close()`)."""

    def __init__(self, base_url: str, model: str, max_tokens: int = 1500, timeout: float = 60.0,
                 prompt: str = "Once upon a time"):
        super().__init__(daemon=True)
        self.base_url, self.model, self.max_tokens, self.timeout = base_url, model, max_tokens, timeout
        self.prompt = prompt
        self.started = threading.Event()
        self.replica: str | None = None
        self.chunks, self.last_chunk = 0, None  # while it runs
        self.outcome: Outcome | None = None
        self._close = threading.Event()

    def run(self) -> None:
        def on_chunk(out):
            self.replica, self.chunks, self.last_chunk = out.replica, out.chunks, time.monotonic()
            self.started.set()

        body = {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "ignore_eos": True, "stream": True}
        self.outcome = completion(self.base_url, body, timeout=self.timeout, on_chunk=on_chunk,
                                  should_stop=self._close.is_set)

    def begin(self) -> LongStream:
        """Start, and return once the first token arrived."""
        self.start()
        assert self.started.wait(30), "the long stream never started"
        return self

    def describe(self) -> str:
        """Where it runs and how far it got, for a failure's message."""
        since = f"{time.monotonic() - self.last_chunk:.0f} s ago" if self.last_chunk else "never"
        state = f"ended: {self.outcome}" if self.outcome else "running"
        return f"stream on replica {self.replica}, {self.chunks} chunks, the last {since}, {state}"

    def close(self) -> Outcome:
        """Leave the stream (the client goes away) and return how it ended."""
        self._close.set()
        self.join(timeout=self.timeout + 10)
        assert not self.is_alive(), "a long stream hung"
        return self.outcome


@dataclass
class Load:
    """Steady load: `threads` clients, each sending one request after another (streams and whole responses,
    varied lengths) until `stop()`, which returns every outcome."""

    base_url: str
    model: str
    threads: int = 4
    max_tokens: tuple[int, int] = (8, 48)
    headers: dict | None = None
    timeout: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]

    def start(self) -> Load:
        for w in self._workers:
            w.start()
        return self

    def __enter__(self) -> Load:
        """`with Load(...) as load:` stops the clients when the block ends, also when a test fails in it (left
        running, they would load the machine for the rest of the suite)."""
        return self.start()

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.stop()
        else:
            self._stop.set()
            for w in self._workers:
                w.join(timeout=self.timeout + 10)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=self.timeout + 10)
        assert not any(w.is_alive() for w in self._workers), "a client hung past its timeout"
        return list(self.outcomes)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            body = {"model": self.model, "prompt": rng.choice(TEXTS), "max_tokens": rng.randint(*self.max_tokens),
                    "ignore_eos": True, "temperature": 0, "stream": rng.random() < 0.5}
            out = completion(self.base_url, body, self.headers, self.timeout)
            with self._lock:
                self.outcomes.append(out)
            if out.status is None:  # no server there (yet, or any more): no busy loop of refused connections
                self._stop.wait(0.2)


def summarize(outcomes: list[Outcome]) -> dict:
    failed = [o for o in outcomes if not o.ok]
    return {"requests": len(outcomes), "failed": len(failed),
            "failed_streams_after_tokens": sum(1 for o in failed if o.stream and o.chunks > 0),
            "statuses": sorted({o.status for o in outcomes}, key=str)}
