"""Whether bfloat16 answers as float32 does: SmolLM2-135M-Instruct (built in), greedy, on fp8_quality.py's 50 fixed
chat prompts, the first 16 answer tokens, bfloat16 against float32 on the same device (the CPU by default, where
bfloat16 is the default dtype on CPUs with native bfloat16 arithmetic). Figures as fp8_quality.py's: next-token
agreement and answers equal up to their first difference; and the answer to "What is the capital of France?" in each
dtype. Writes JSON under benchmarks/results/.

    python benchmarks/bf16_quality.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.fp8_quality import PROMPTS, agreement, next_token_agreement  # noqa: E402
from benchmarks.report import write_result  # noqa: E402

CAPITAL = "What is the capital of France?"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    from engine import LLM, SamplingParams
    from engine.tokenizer import apply_chat_template

    params = SamplingParams(temperature=0, max_tokens=args.tokens)
    answers, capital, figures, prompts = {}, {}, {}, None
    for dtype in ("float32", "bfloat16"):
        with LLM(args.model, device=args.device, dtype=dtype) as llm:
            tokenizer = llm.get_tokenizer()
            if prompts is None:
                prompts = [apply_chat_template(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
            answers[dtype] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            asked = apply_chat_template(tokenizer, [{"role": "user", "content": CAPITAL}])
            capital[dtype] = llm.generate([asked], SamplingParams(temperature=0, max_tokens=24),
                                          use_tqdm=False)[0].outputs[0].text
            if dtype == "bfloat16":
                figures = {"next_token": next_token_agreement(llm, prompts, answers["float32"], args.tokens),
                           "answers": agreement(answers["float32"], answers[dtype], args.tokens)}
            device = str(llm.engine.executor.describe()["device"])
    figures["capital_of_france"] = capital
    print(f"bfloat16 against float32 on {device}: next-token agreement {100 * figures['next_token']['fraction']:.1f}%, "
          f"answers equal up to their first difference {100 * figures['answers']['fraction']:.1f}% "
          f"({figures['answers']['identical_answers']} of {figures['answers']['answers']} identical)")
    for dtype, text in capital.items():
        print(f"{CAPITAL} {dtype}: {text!r}")
    settings = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "resolved_device": device,
                "prompts": len(PROMPTS)}
    print(f"wrote {write_result('bf16-quality', settings, figures, args.out_dir)}")
    return figures


if __name__ == "__main__":
    main()
