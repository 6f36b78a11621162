"""The shared-memory ring between processes: order, wrap-around, objects bigger than a slot, timeouts, readers."""
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.executor.shm_channel import ShmChannel
from tests.support.paths import ROOT

fork = multiprocessing.get_context("fork")


def read_all(name: str, reader: int, count: int, results, delay_s: float = 0.0) -> None:
    channel = ShmChannel.attach(name, reader)
    got = []
    for _ in range(count):
        got.append(channel.read(timeout=30))
        time.sleep(delay_s)
    channel.close()
    results.put(got)


def run_readers(channel: ShmChannel, items: list, delay_s: float = 0.0) -> list[list]:
    """Write `items` to readers in other processes; what each of them read."""
    results = fork.Queue()
    procs = [fork.Process(target=read_all, args=(channel.name, r, len(items), results, delay_s))
             for r in range(channel.num_readers)]
    for p in procs:
        p.start()
    for item in items:
        channel.write(item, timeout=30)
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    return got


def test_many_items_arrive_in_order_and_a_reader_leaving_keeps_the_segment():
    channel = ShmChannel.create(1, num_slots=4, slot_bytes=4096)
    try:
        items = [(i, "x" * (i % 97)) for i in range(3000)] + [None, {"last": [1, 2, 3]}]
        assert run_readers(channel, items) == [items]
        ShmChannel.attach(channel.name).close()  # the reader's exit did not unlink it
    finally:
        channel.close()


def read_slowly(name: str, count: int, writes_done, results) -> None:
    """Read `count` items, pausing after each; record how many writes had returned when each item was read."""
    channel = ShmChannel.attach(name, 0)
    got, written = [], []
    for _ in range(count):
        got.append(channel.read(timeout=30))
        written.append(writes_done.value)
        time.sleep(0.01)
    channel.close()
    results.put((got, written))


def test_a_slow_reader_holds_the_writer_back_as_the_ring_wraps():
    channel = ShmChannel.create(1, num_slots=2, slot_bytes=256)
    writes_done = fork.Value("i", 0)
    results = fork.Queue()
    reader = fork.Process(target=read_slowly, args=(channel.name, 40, writes_done, results))
    try:
        reader.start()
        for i in range(40):
            channel.write(i, timeout=30)
            writes_done.value += 1
        got, written = results.get(timeout=60)
        reader.join(10)
        assert reader.exitcode == 0 and got == list(range(40))
        # A write returns only once its slot is free: when the reader had taken item i (acknowledging it), at
        # most the two slots past it were written, whatever the timing.
        assert all(w <= i + 1 + 2 for i, w in enumerate(written)), written
    finally:
        channel.close()


def test_objects_bigger_than_a_slot_and_than_the_ring_stream_through_in_order():
    channel = ShmChannel.create(1, num_slots=2, slot_bytes=1024)
    try:
        items = ["small", bytes(range(256)) * 20, "between", list(range(5000)), b""]
        assert run_readers(channel, items) == [items]
    finally:
        channel.close()


def test_two_readers_both_get_everything():
    channel = ShmChannel.create(2, num_slots=3, slot_bytes=512)
    try:
        items = [[i] * (i % 200) for i in range(500)]
        assert run_readers(channel, items, delay_s=0.0005) == [items, items]
    finally:
        channel.close()


def test_waits_time_out_or_stop():
    channel = ShmChannel.create(1, num_slots=2, slot_bytes=256, reader=0)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            channel.read(timeout=0.2)
        assert time.monotonic() - t0 >= 0.2  # it waited out its timeout before giving up
        with pytest.raises(InterruptedError):
            channel.read(timeout=5, should_stop=lambda: time.monotonic() - t0 > 0.4)
        channel.write(1)
        channel.write(2)
        with pytest.raises(TimeoutError):  # the reader has acked neither
            channel.write(3, timeout=0.1)
        assert channel.ready() and channel.read() == 1
        channel.write(3, timeout=0.1)
        assert [channel.read(), channel.read()] == [2, 3] and not channel.ready()
    finally:
        channel.close()


def test_a_channel_dropped_without_close_exits_cleanly():
    """An engine that never shut down leaves its channels to the garbage collector: no BufferError from
    SharedMemory's finalizer and no leaked segment at exit."""
    code = ("from engine.executor.shm_channel import ShmChannel\n"
            "c = ShmChannel.create(1)\nc.write({'a': 1})\nprint(c.name)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "BufferError" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr
    assert not Path("/dev/shm", proc.stdout.strip().lstrip("/")).exists()
