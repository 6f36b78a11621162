"""What the tests send: texts and chat messages for the HTTP API, random token ids for the engine."""
from __future__ import annotations

import torch

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]
TEXTS = ["The capital of France is", "Hello, how are you today?", "Once upon a time there was",
         "Serving engines batch many requests", "def main():", "The quick brown fox"]


def random_prompts(seed: int = 1, lens: tuple[int, ...] = (5, 17, 33, 64)) -> list[list[int]]:
    """Token-id prompts of the given lengths, drawn from ids 3-511 (inside the tiny models' 512-token vocab)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lens]
