"""A single-writer, multi-reader ring of pickled objects in shared memory, between processes of one host.

Layout: a header [num_slots, slot_bytes, num_readers], one ack counter per reader (the last sequence number it
has read, each on a cache line of its own), then the slots, each [seq, length, more | payload]. Sequence numbers
count chunks from 1; chunk s lives in slot (s - 1) % num_slots, which the writer reuses only once every reader
has acked chunk s - num_slots. An object too big for a slot spans consecutive chunks (`more`: how many are still
to come), and one bigger than the whole ring streams through it as the readers free slots, so order is kept."""
from __future__ import annotations

import pickle
import time
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

LINE = 64  # bytes
WORDS = LINE // 8


class ShmChannel:
    spin_s = 50e-6  # poll this long before sleeping, then sleep in doubling steps up to max_sleep_s
    max_sleep_s = 1e-3

    def __init__(self, shm: SharedMemory, reader: int | None, owner: bool):
        """Use `create` or `attach`. `reader`: this end's reader index (None for the writer)."""
        self.shm, self.reader, self.owner = shm, reader, owner
        self.words = shm.buf.cast("Q")  # aligned 8-byte loads and stores, each a single (atomic) access on x86-64
        self.num_slots, self.slot_bytes, self.num_readers = self.words[0], self.words[1], self.words[2]
        self.slots_at = LINE * (1 + self.num_readers)
        self.written = max(self.words[self._slot(s)[0]] for s in range(1, self.num_slots + 1))
        self.next = 1 if reader is None else self.words[self._ack(reader)] + 1

    @classmethod
    def create(cls, num_readers: int, num_slots: int = 4, slot_bytes: int = 4 << 20,
               reader: int | None = None) -> ShmChannel:
        slot_bytes = -(-slot_bytes // LINE) * LINE
        shm = SharedMemory(create=True, size=LINE * (1 + num_readers) + num_slots * (LINE + slot_bytes))
        words = shm.buf.cast("Q")
        words[0], words[1], words[2] = num_slots, slot_bytes, num_readers
        words.release()
        return cls(shm, reader, owner=True)

    @classmethod
    def attach(cls, name: str, reader: int | None = None) -> ShmChannel:
        return cls(_attach(name), reader, owner=False)

    @property
    def name(self) -> str:
        return self.shm.name

    def write(self, obj, timeout: float | None = None, should_stop=None) -> None:
        """Raises TimeoutError when a reader leaves no slot free in time, InterruptedError when should_stop()."""
        data = memoryview(pickle.dumps(obj, protocol=5))
        chunks, deadline = max(1, -(-len(data) // self.slot_bytes)), _deadline(timeout)
        for i in range(chunks):
            seq = self.written + 1
            self._wait(lambda: self._min_ack() >= seq - self.num_slots, deadline, should_stop, "no free slot")
            head, at = self._slot(seq)
            part = data[i * self.slot_bytes:(i + 1) * self.slot_bytes]
            self.shm.buf[at:at + len(part)] = part
            self.words[head + 1], self.words[head + 2] = len(part), chunks - 1 - i
            # Written last: x86 keeps stores in order, so a reader that sees the new seq sees payload and length.
            # (A weakly ordered CPU would need a release fence here and an acquire fence in the reader.)
            self.words[head] = self.written = seq

    def ready(self) -> bool:
        """Whether the next object has begun to arrive (read() then returns without waiting for it to start)."""
        return self.words[self._slot(self.next)[0]] == self.next

    def read(self, timeout: float | None = None, should_stop=None):
        """The next object. Raises TimeoutError when none comes in time, InterruptedError when should_stop()."""
        deadline, parts, more = _deadline(timeout), [], 1
        while more:
            seq = self.next
            head, at = self._slot(seq)
            self._wait(lambda: self.words[head] == seq, deadline, should_stop, "nothing came")
            n, more = self.words[head + 1], self.words[head + 2]
            parts.append(bytes(self.shm.buf[at:at + n]))
            self.words[self._ack(self.reader)] = seq  # after the copy: the writer may reuse the slot from now on
            self.next = seq + 1
        return pickle.loads(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        """Detach; the creator also removes the segment."""
        if getattr(self, "words", None) is None:  # closed already, or __init__ never got that far
            return
        self.words.release()
        self.words = None
        self.shm.close()
        if self.owner:
            self.shm.unlink()

    def __del__(self) -> None:
        # A channel dropped without close() (its engine never shut down): release our view of the segment before
        # SharedMemory's own finalizer closes it, which otherwise fails with "cannot close exported pointers exist".
        self.close()

    def _slot(self, seq: int) -> tuple[int, int]:
        """(word index of the slot's header, byte offset of its payload) for chunk `seq`."""
        at = self.slots_at + (seq - 1) % self.num_slots * (LINE + self.slot_bytes)
        return at // 8, at + LINE

    def _ack(self, reader: int) -> int:
        return WORDS * (1 + reader)

    def _min_ack(self) -> int:
        return min(self.words[self._ack(r)] for r in range(self.num_readers))

    def _wait(self, ready, deadline: float | None, should_stop, failure: str) -> None:
        if ready():
            return
        spin_until, sleep = time.monotonic() + self.spin_s, self.spin_s
        while not ready():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"{failure} in shared memory {self.name} in time")
            if should_stop is not None and should_stop():
                raise InterruptedError(f"stopped waiting on shared memory {self.name}")
            if now >= spin_until:
                time.sleep(sleep)
                sleep = min(2 * sleep, self.max_sleep_s)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _attach(name: str) -> SharedMemory:
    """Open a segment without registering it with this process's resource tracker: before Python 3.13 every
    process that opens a segment registers it, and its tracker unlinks the segment, warning of a leak, when that
    process exits, under the creator's feet (bpo-39959)."""
    register = resource_tracker.register
    resource_tracker.register = lambda *args: None
    try:
        return SharedMemory(name)
    finally:
        resource_tracker.register = register
