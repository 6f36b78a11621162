"""A step's batch as the flat arrays the model reads (token ids, positions, KV-cache slots, query start offsets,
sequence lengths, the padded block table and the rows that sample), built with numpy: at a thousand sequences a
step, per-token Python here cost more host time than the GPU took for the step."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from engine.step import BatchInput


@dataclass
class StepArrays:
    ids: np.ndarray  # int64 [T]; PENDING_TOKEN where the token is still on the device
    positions: np.ndarray  # int64 [T]
    slots: np.ndarray  # int64 [T]: block * block_size + offset, -1 for a sequence without blocks
    query_start_loc: np.ndarray  # int32 [B + 1]
    seq_lens: np.ndarray  # int32 [B]: tokens in the cache once the step has run
    block_tables: np.ndarray  # int32 [B, widest table], zero-padded
    last: np.ndarray  # int64: the token index of each sampling row's last token
    query_lens: list[int]


def step_arrays(batch: BatchInput, block_size: int) -> StepArrays:
    query_lens = list(map(len, batch.token_ids))
    n_seqs = len(query_lens)
    lens = np.array(query_lens, dtype=np.int64)
    starts = np.array(batch.start_positions, dtype=np.int64)
    qsl = np.zeros(n_seqs + 1, dtype=np.int64)
    np.cumsum(lens, out=qsl[1:])
    total = int(qsl[-1])
    ids = np.fromiter(itertools.chain.from_iterable(batch.token_ids), dtype=np.int64, count=total)
    if total == n_seqs:  # decode only: one token a sequence
        row, positions = np.arange(n_seqs), starts
    else:
        row = np.repeat(np.arange(n_seqs), lens)
        positions = np.arange(total, dtype=np.int64) - np.repeat(qsl[:-1] - starts, lens)
    table_lens = np.fromiter(map(len, batch.block_tables), dtype=np.int64, count=n_seqs)
    width = int(table_lens.max(initial=0)) or 1
    tables = np.zeros((n_seqs, width), dtype=np.int32)
    tables[np.arange(width) < table_lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(batch.block_tables), dtype=np.int32, count=int(table_lens.sum()))
    blocks = tables[row, np.minimum(positions // block_size, width - 1)].astype(np.int64)
    slots = np.where(table_lens[row] > 0, blocks * block_size + positions % block_size, -1)
    last = (qsl[1:] - 1)[np.array(batch.sample, dtype=bool)]
    return StepArrays(ids=ids, positions=positions, slots=slots, query_start_loc=qsl.astype(np.int32),
                      seq_lens=(starts + lens).astype(np.int32), block_tables=tables, last=last,
                      query_lens=query_lens)
