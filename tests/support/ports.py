"""A free TCP port for a test's server, from a range nothing else on the machine is handed out of by chance."""
import random
import socket

# Below the kernel's ephemeral ports (32768-60999 by default) and above Ray's worker ports (10002-19999): a port
# the OS picked at random could be handed to one of the many Ray processes a test starts before its server binds
# it (seen: Serve's proxy failing to bind 127.0.0.1:42351 in CI).
LOW, HIGH = 20000, 32767


def free_port() -> int:
    for port in random.sample(range(LOW, HIGH), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {LOW}-{HIGH}")
