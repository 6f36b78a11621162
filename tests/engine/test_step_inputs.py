"""step_arrays (numpy) against the per-token reading of a batch it replaced: mixed prefill chunks and decodes,
pending tokens, a sequence without blocks, tables of different widths."""
import random

import numpy as np
import pytest

from engine.step import PENDING_TOKEN, BatchInput
from engine.step_inputs import step_arrays


def reference(batch: BatchInput, bs: int) -> dict:
    ids, positions, slots, q_lens, seq_lens = [], [], [], [], []
    for tokens, start, table in zip(batch.token_ids, batch.start_positions, batch.block_tables):
        n = len(tokens)
        ids.extend(tokens)
        pos = range(start, start + n)
        positions.extend(pos)
        slots.extend(table[p // bs] * bs + p % bs for p in pos) if table else slots.extend([-1] * n)
        q_lens.append(n)
        seq_lens.append(start + n)
    width = max((len(t) for t in batch.block_tables), default=0) or 1
    tables = [t + [0] * (width - len(t)) for t in batch.block_tables]
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    last = [qsl[i + 1] - 1 for i, s in enumerate(batch.sample) if s]
    return dict(ids=ids, positions=positions, slots=slots, query_start_loc=qsl, seq_lens=seq_lens,
                block_tables=tables, last=last, query_lens=q_lens)


def random_batch(rng: random.Random, n_seqs: int, bs: int, decode_only: bool) -> BatchInput:
    batch, next_block = BatchInput(), 0
    for i in range(n_seqs):
        start = rng.randint(0, 300)
        n = 1 if decode_only or rng.random() < 0.6 else rng.randint(1, 70)
        blocks = -(-(start + n) // bs)
        table = [] if i == 3 else rng.sample(range(next_block, next_block + 4 * blocks), blocks)
        next_block += 4 * blocks
        tokens = [rng.randrange(32000) for _ in range(n)]
        if n == 1 and rng.random() < 0.7:
            tokens = [PENDING_TOKEN]
        batch.req_ids.append(f"r{i}")
        batch.token_ids.append(tokens)
        batch.start_positions.append(start)
        batch.block_tables.append(table)
        batch.sample.append(rng.random() < 0.8)
    return batch


@pytest.mark.parametrize("n_seqs,decode_only", [(1, True), (5, False), (64, False), (300, True), (300, False)])
@pytest.mark.parametrize("bs", [1, 16])
def test_step_arrays_match_the_per_token_reading(n_seqs, decode_only, bs):
    batch = random_batch(random.Random(n_seqs * 31 + bs), n_seqs, bs, decode_only)
    got, want = step_arrays(batch, bs), reference(batch, bs)
    for name, expected in want.items():
        value = getattr(got, name)
        assert (np.asarray(value).tolist() if isinstance(value, np.ndarray) else value) == expected, name
    assert got.ids.dtype == got.positions.dtype == got.slots.dtype == got.last.dtype == np.int64
    assert got.query_start_loc.dtype == got.seq_lens.dtype == got.block_tables.dtype == np.int32
