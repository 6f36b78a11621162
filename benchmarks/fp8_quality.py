"""How much online FP8 changes a model's answers: SmolLM2-135M-Instruct (built in) quantized to FP8 while it loads,
against the same model unquantized, greedy, on 50 fixed chat prompts, over the first 16 answer tokens. Two figures:
- next-token agreement: at each position of the unquantized answer, whether FP8 given the same text so far picks
  the same next token (every position counts once; the issue's target is 90%);
- answer agreement: tokens equal before each pair of free-running answers first differ (after a difference the two
  continue from different text, so this is the strict one).
The same figures for float32 against the unquantized dtype say how much a 16-bit dtype alone moves the answers.
Writes JSON under benchmarks/results/.

    python benchmarks/fp8_quality.py                 # CPU: the torch path, FP8 rounding emulated exactly
    python benchmarks/fp8_quality.py --device cuda   # the Triton FP8 kernels
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.report import write_result  # noqa: E402

SUBJECTS = ["the moon", "a bicycle", "photosynthesis", "the ocean", "a volcano", "bread", "a rainbow", "chess",
            "the heart", "electricity", "a library", "winter", "bees", "a compass", "music", "the internet",
            "coffee", "a bridge", "gravity", "a forest", "the alphabet", "a clock", "clouds", "a camera", "salt"]
PROMPTS = [f"In one sentence, what is {s}?" for s in SUBJECTS] + [f"Give me one fun fact about {s}." for s in SUBJECTS]


def agreement(reference: list[list[int]], other: list[list[int]], tokens: int) -> dict:
    """Tokens equal at the same position before each answer's first difference, over all first `tokens`."""
    same = [next((i for i, (a, b) in enumerate(zip(r[:tokens], o[:tokens])) if a != b), min(len(r), tokens))
            for r, o in zip(reference, other)]
    total = sum(min(len(r), tokens) for r in reference)
    return {"agreeing_tokens": sum(same), "tokens": total, "fraction": sum(same) / total,
            "identical_answers": sum(s == min(len(r), tokens) for s, r in zip(same, reference)),
            "answers": len(reference)}


def next_token_agreement(llm, prompts: list[list[int]], reference: list[list[int]], tokens: int) -> dict:
    """Share of positions where `llm`, given a prompt and the reference answer so far, picks the reference's next
    token (one batch of one-token generations)."""
    from engine import SamplingParams

    contexts = [p + r[:i] for p, r in zip(prompts, reference) for i in range(min(len(r), tokens))]
    expected = [t for r in reference for t in r[:tokens]]
    picked = [o.outputs[0].token_ids[0] for o in llm.generate(contexts, SamplingParams(temperature=0, max_tokens=1),
                                                               use_tqdm=False)]
    same = sum(a == b for a, b in zip(picked, expected))
    return {"agreeing_tokens": same, "tokens": len(expected), "fraction": same / len(expected)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    from engine import LLM, SamplingParams

    from engine.tokenizer import apply_chat_template

    params = SamplingParams(temperature=0, max_tokens=args.tokens)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    answers, figures, prompts = {}, {}, None
    for name, dtype, quantization in (("reference", args.dtype, None), ("fp8", args.dtype, "fp8"),
                                      ("float32", "float32", None)):
        with LLM(args.model, device=args.device, dtype=dtype, quantization=quantization) as llm:
            if prompts is None:
                prompts = [apply_chat_template(llm.get_tokenizer(), c) for c in conversations]
            answers[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            if name != "reference":
                figures[name] = {"next_token": next_token_agreement(llm, prompts, answers["reference"], args.tokens),
                                 "answers": agreement(answers["reference"], answers[name], args.tokens)}
            device = str(llm.engine.executor.describe()["device"])
    for name, f in figures.items():
        print(f"{name} against {args.dtype}: next-token agreement {100 * f['next_token']['fraction']:.1f}%, "
              f"answers equal up to their first difference {100 * f['answers']['fraction']:.1f}% "
              f"({f['answers']['identical_answers']} of {f['answers']['answers']} identical), on {device}")
    settings = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "resolved_device": device,
                "prompts": len(PROMPTS)}
    path = write_result("fp8-quality", settings, figures, args.out_dir)
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
