"""Pipeline stages pass sampled tokens from the last stage to the first over gloo on CPU. The first stage posts a
receive for every step that samples, and a later step reads it only if its placeholders still need it: receives
that no step reads must still take their own message, or every later receive comes up empty (the PP=2 async test
once hung on a busy 2-core host this way)."""
import multiprocessing as mp
import os
import socket
import time

import torch

STEPS = [[11], [12, 13], [14, 15, 16]]  # the last stage samples these: as many steps as are ever in flight (pp + 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage(rank: int, port: int, ready, results) -> None:
    import torch.distributed as dist

    from engine.parallel_state import PPStage

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    stage = PPStage(index=rank, size=2, rank=rank, tp_size=1, token_group=dist.new_group([0, 1]))
    if rank == 0:
        received = [stage.recv_tokens(len(t), torch.device("cpu")) for t in STEPS]
        del received[:-1]  # no later step read these: all but the last step's receive are dropped unread
        ready.set()  # only now does the last stage send, so the dropped receives' messages come after the drop
        results.put(received[0].get().tolist())
    else:
        ready.wait()
        for tokens in STEPS:
            stage.send_tokens(torch.tensor(tokens))
        while stage._token_sends:
            stage._token_sends.popleft().wait()
    dist.barrier()
    dist.destroy_process_group()


def test_tokens_reach_the_first_stage_when_earlier_receives_go_unread():
    ctx = mp.get_context("spawn")
    ready, results, port = ctx.Event(), ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_stage, args=(r, port, ready, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 60
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(p.is_alive() for p in procs), "the first stage never received the last step's tokens"
        assert [p.exitcode for p in procs] == [0, 0]
        assert results.get(timeout=5) == STEPS[-1]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
