"""What structured outputs cost: grammar compile time per JSON schema, and the time per decode step of a batch of
constrained requests against the same batch unconstrained (same prompts, same number of output tokens).

The model must have a real tokenizer (a grammar needs tokens such as `{` and `"`): build a random checkpoint with
`make_random_model.py --tokenizer DIR`. Writes JSON (and prints a summary).

    python benchmarks/structured_outputs.py --model /tmp/llama3-8b-smoltok --batch 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMAS = {
    "forecast": {"type": "object", "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"},
                                                  "sky": {"enum": ["clear", "cloudy", "rain"]}},
                 "required": ["city", "celsius", "sky"]},
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "emails": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 4},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"pattern": "^[0-9]{5}$",
                                                                                            "type": "string"}},
                    "required": ["street", "zip"]}}, "required": ["name", "age", "address"]},
    "tool_calls": {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"enum": ["get_weather"]}, "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}},
         "required": ["name", "parameters"]},
        {"properties": {"name": {"enum": ["search"]}, "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query"]}},
         "required": ["name", "parameters"]}]}},
    "order": {"type": "object", "properties": {
        "id": {"type": "string"}, "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}, "price": {"type": "number"}},
            "required": ["sku", "qty", "price"]}}, "status": {"enum": ["new", "paid", "shipped"]},
        "notes": {"type": ["string", "null"]}}, "required": ["id", "items", "status"]},
}
# Never complete within the step count below, so every request decodes every step.
ENDLESS = r"[a-z ,.]{4000}"


def compile_times(model: str) -> dict:
    """Each schema compiled cold against the model's vocabulary (one TokenizerInfo, built first), then asked for
    again: the second time it comes from the compiler's cache."""
    from engine import EngineConfig, StructuredOutputsParams, get_tokenizer
    from engine.models.loader import load_hf_config
    from engine.model_source import resolve_model
    from engine.structured_output import GrammarCompiler

    tokenizer = get_tokenizer(EngineConfig(model=model))
    vocab = load_hf_config(resolve_model(model)).vocab_size
    compiler = GrammarCompiler(tokenizer, vocab, {tokenizer.eos_token_id})
    t = time.perf_counter()
    compiler.submit(StructuredOutputsParams(regex="a")).result()
    out = {"tokenizer_info_and_first_regex_ms": (time.perf_counter() - t) * 1e3, "schemas_ms": {},
           "cached_schemas_ms": {}}
    for name, schema in SCHEMAS.items():
        for key in ("schemas_ms", "cached_schemas_ms"):
            t = time.perf_counter()
            compiler.submit(StructuredOutputsParams(json=schema)).result()
            out[key][name] = (time.perf_counter() - t) * 1e3
    compiler.shutdown()
    return out


def step_times(args) -> dict:
    from engine import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(args.model, enable_prefix_caching=False)
    try:
        vocab = llm.engine.setup.hf_config.vocab_size
        prompts = [[(17 + 31 * i + 7 * j) % vocab for j in range(args.input_len)] for i in range(args.batch)]
        free = SamplingParams(temperature=1.0, seed=0, max_tokens=args.steps, ignore_eos=True)
        endless = SamplingParams(temperature=1.0, seed=0, max_tokens=args.steps, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(regex=ENDLESS))
        json_schema = SamplingParams(temperature=1.0, seed=0, max_tokens=args.steps,
                                     structured_outputs=StructuredOutputsParams(json=SCHEMAS["order"]))
        cases = {"unconstrained": [free] * args.batch, "regex_every_request": [endless] * args.batch,
                 "regex_half_the_batch": [endless, free] * (args.batch // 2)}
        llm.generate(prompts, endless, use_tqdm=False)  # warm-up: Triton variants and the grammar's compile
        out = {}
        for _ in range(args.repeats):
            for name, params in cases.items():
                t = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - t
                tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
                out.setdefault(name, []).append({"seconds": seconds, "output_tokens": tokens,
                                                 "ms_per_step": seconds / args.steps * 1e3})
        t = time.perf_counter()
        outs = llm.generate(prompts, json_schema, use_tqdm=False)
        texts = [c.text for o in outs for c in o.outputs]
        valid = sum(1 for o in outs for c in o.outputs if c.finish_reason == "stop" and _parses(c.text))
        out["json_schema_order"] = {"seconds": time.perf_counter() - t,
                                    "output_tokens": sum(len(c.token_ids) for o in outs for c in o.outputs),
                                    "finished_and_valid": valid, "requests": len(texts), "example": texts[0][:300]}
        return out
    finally:
        llm.shutdown()


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--compile-only", action="store_true", help="grammar compile times only (any machine)")
    args = ap.parse_args()
    import torch

    figures = {"compile": compile_times(args.model)}
    figures["summary"] = {"compile_ms_max": max(figures["compile"]["schemas_ms"].values()),
                          "cached_compile_ms_max": max(figures["compile"]["cached_schemas_ms"].values())}
    if not args.compile_only:
        figures["decode"] = step_times(args)
        med = {k: statistics.median(r["ms_per_step"] for r in v) for k, v in figures["decode"].items()
               if isinstance(v, list)}
        figures["summary"].update(
            ms_per_step_median=med, regex_every_request_vs_unconstrained=med["regex_every_request"] / med["unconstrained"],
            regex_half_vs_unconstrained=med["regex_half_the_batch"] / med["unconstrained"])
    commit = os.environ.get("STRATA_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "structured-outputs", "commit": commit or None,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}",
              "time": time.strftime("%Y%m%d-%H%M%S"), "settings": {k: str(v) for k, v in vars(args).items()},
              "figures": figures}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"structured-outputs-{result['time']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(figures["summary"], indent=2), json.dumps(figures["compile"], indent=2))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
