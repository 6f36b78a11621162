"""Offline throughput on the shared workloads (W1 batch-1 decode, W2 nano-vllm, W3 ShareGPT-like), with
`transformers` generate on the same prompts as the baseline.

    python benchmarks/throughput.py --model demo --device cpu                 # CPU smoke run
    python benchmarks/throughput.py --model /tmp/llama3-8b-random --workloads W1 W2 W3
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_result  # noqa: E402
from benchmarks.workloads import WORKLOADS  # noqa: E402


def load_workload(name: str, vocab: int, limit: int | None):
    prompts, out_lens = WORKLOADS[name]()
    folded = vocab < 10000  # tiny models: keep the lengths, fold the ids into their vocab
    if folded:
        prompts = [[t % vocab for t in p] for p in prompts]
    if limit:
        prompts, out_lens = prompts[:limit], out_lens[:limit]
    return prompts, out_lens, folded


def run_engine(llm, prompts, out_lens) -> dict:
    from engine import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    # Time the driver spends blocked on the workers (near zero means the driver's own work limits the step rate,
    # not the devices), and in each part of that work (host_ms_per_step: scheduling, building the batch, turning
    # it into tensors, launching the forward pass, detokenizing and bookkeeping in finish_step).
    core = llm.engine
    runner = getattr(core.executor, "runner", None)  # this process's model runner, with one device
    parts = {"wait": (core.executor, "wait"), "schedule": (core.scheduler, "schedule"), "batch": (core, "_batch"),
             "finish_step": (core, "_finish_step")}
    if runner is not None:
        parts.update(prepare=(runner, "_prepare"), forward_launch=(runner, "_forward"),
                     logits_launch=(runner.model, "logits"), sample=(runner, "sample"))
    seconds_in = dict.fromkeys(parts, 0.0)
    originals = {name: getattr(obj, attr) for name, (obj, attr) in parts.items()}

    def timed(name, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds_in[name] += time.perf_counter() - t
        return call

    for name, (obj, attr) in parts.items():
        setattr(obj, attr, timed(name, originals[name]))
    steps = core.steps
    _sync()
    allocator_before = _allocator_counts()
    t0 = time.perf_counter()
    try:
        outs = llm.generate(prompts, params)
    finally:
        for name, (obj, attr) in parts.items():
            setattr(obj, attr, originals[name])
    _sync()
    seconds = time.perf_counter() - t0
    allocator = {k: v - allocator_before[k] for k, v in _allocator_counts().items()}
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(out_lens), "every request must produce exactly its fixed output length"
    n_steps = core.steps - steps
    waited = seconds_in.pop("wait")
    return {"seconds": seconds, "output_tokens": produced, "output_tok_s": produced / seconds,
            "total_tok_s": (produced + sum(map(len, prompts))) / seconds, "steps": n_steps,
            "driver_waiting_s": waited,
            "host_ms_per_step": {k: round(1e3 * v / max(n_steps, 1), 3) for k, v in seconds_in.items()},
            **({"cuda_allocator": allocator} if allocator else {})}


def _allocator_counts() -> dict:
    """The CUDA caching allocator's cudaMalloc and cudaFree calls and its retries (a retry frees cached blocks,
    which waits for the device): all should stay flat while a workload runs."""
    import torch

    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries",
                                          "num_sync_all_streams")}


def warm_up(llm, prompts, vocab: int, n: int = 32) -> None:
    """Run `n` prompts shaped like the workload's first ones (other token ids, so the prefix cache gives the timed
    run nothing) for a few tokens: Triton compiles a kernel variant the first time a batch shape needs it (and
    keeps it in its on-disk cache), which is a one-time cost that would otherwise land inside the timing."""
    from engine import SamplingParams

    shifted = [[(t + 1) % vocab for t in p] for p in prompts[:n]]
    llm.generate(shifted, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0), use_tqdm=False)


def run_transformers(model_dir: Path, prompts, out_lens, batch_size: int, dtype, device) -> dict:
    """Padded batches (left padding) generating the batch's longest output; only requested tokens count."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    useful = 0
    _sync()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, outs = prompts[i:i + batch_size], out_lens[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(batch):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        with torch.no_grad():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(outs),
                           min_new_tokens=max(outs), do_sample=False, pad_token_id=0, eos_token_id=None)
        useful += sum(outs)
    _sync()
    seconds = time.perf_counter() - t0
    del model
    return {"seconds": seconds, "output_tokens": useful, "output_tok_s": useful / seconds, "batch_size": batch_size,
            "num_prompts": len(prompts)}


def decode_roofline(llm, batch: int, ctx: int, steps: int, copy_bytes_per_s: float, profile: bool = False) -> dict:
    """Time pure decode steps of `batch` sequences at `ctx` tokens of context against the bytes each step must
    move (all weights once, plus every sequence's KV), at the device's copy bandwidth. `profile`: then profile
    8 more steps with torch.profiler and report where the GPU time goes."""
    from engine import SamplingParams

    core = llm.engine
    for i in range(batch):
        core.add_request(f"roofline-{i}", [(i * 7 + j) % 1000 + 3 for j in range(ctx)],
                         SamplingParams(max_tokens=steps + 12, ignore_eos=True, temperature=0))
    while any(not r.output_token_ids for r in core.scheduler.requests.values()):  # prefill everything first
        core.step()
    # Between two returns of step() the engine is in the same state (with async scheduling: one step in flight),
    # so the window holds exactly `steps` steps of GPU time; no device sync at either end.
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    seconds = (time.perf_counter() - t0) / steps
    kernels = _profile_steps(core, 8) if profile else None
    while core.has_work:
        core.step()
    cfg = core.setup.hf_config
    weight_bytes = sum(p.numel() * p.element_size() for p in core.executor.runner.model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = batch * (ctx + steps // 2) * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
    bound = (weight_bytes + kv_bytes) / copy_bytes_per_s
    return {"batch": batch, "context": ctx, "ms_per_step": seconds * 1e3, "roofline_ms": bound * 1e3,
            "fraction_of_roofline": bound / seconds, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            **({"profile_8_steps": kernels} if kernels else {})}


def _profile_steps(core, steps: int) -> list[dict]:
    """GPU kernels of `steps` engine steps by total time (printed, and the top 15 returned), plus the share
    of the wall time the GPU was busy."""
    def run():
        for _ in range(steps):
            core.step()
    return _kernel_table(run, f"{steps} steps")


def _workload_kernels(llm, prompts, out_lens, vocab: int) -> list[dict]:
    """The workload run again under torch.profiler (other token ids, so the prefix cache gives it nothing): where
    its GPU time goes, the top 25 kernels."""
    from engine import SamplingParams

    shifted = [[(t + 1) % vocab for t in p] for p in prompts]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    return _kernel_table(lambda: llm.generate(shifted, params, use_tqdm=False), "the workload", top=25)


def _kernel_table(run, what: str, top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run()
        _sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    busy = sum(e.device_time_total for e in events)
    print(f"profile of {what}: GPU busy {busy / 1e3:.2f} ms of {wall_us / 1e3:.2f} ms wall")
    top = [{"kernel": e.key[:90], "calls": e.count, "ms": e.device_time_total / 1e3,
            "share_of_gpu_time": e.device_time_total / max(busy, 1)} for e in events[:top]]
    for k in top:
        print(f"  {100 * k['share_of_gpu_time']:5.1f}%  {k['ms']:8.2f} ms  {k['calls']:6d}  {k['kernel']}")
    return [{"gpu_busy_ms": busy / 1e3, "wall_ms": wall_us / 1e3}] + top


def _cprofile(llm, prompts, out_lens) -> None:
    """Where a batch-1 decode step spends its host time (printed, not recorded)."""
    import cProfile
    import pstats

    from engine import SamplingParams

    prof = cProfile.Profile()
    prof.enable()
    llm.generate([prompts[0]], SamplingParams(max_tokens=64, ignore_eos=True), use_tqdm=False)
    _sync()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def _free_cuda():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3"], choices=list(WORKLOADS))
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each workload")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--quantization", choices=["fp8"], default=None,
                    help="fp8: quantize a 16-bit checkpoint while loading (a quantized checkpoint needs no flag)")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    ap.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    ap.add_argument("--pipeline-parallel-size", "--pp", type=int, default=1)
    ap.add_argument("--enable-expert-parallel", "--ep", action="store_true",
                    help="a mixture-of-experts model's experts whole on ranks, not split across them")
    ap.add_argument("--pipeline-layer-split", type=int, nargs="+", default=None,
                    help="layers per stage (default: the engine's weight-balanced split)")
    ap.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's (1024 on GPUs, 256 on CPU)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--hf-baseline", type=int, default=64, metavar="N",
                    help="run transformers on the first N prompts of each workload (0: skip)")
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--cprofile", action="store_true", help="print a host-side profile of 64 batch-1 decode steps")
    ap.add_argument("--profile", action="store_true", help="with --decode-roofline: profile 8 decode steps")
    ap.add_argument("--kernel-summary", action="store_true",
                    help="after each timed workload, run it again under torch.profiler: its GPU time by kernel")
    ap.add_argument("--torch-profile", type=Path, default=None,
                    help="write a torch.profiler Chrome trace of W1 per rank to this directory (W1 then runs profiled)")
    ap.add_argument("--decode-roofline", action="store_true",
                    help="also time decode (batch 64, 1k context by default) against the bytes-moved roofline (CUDA)")
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[64],
                    help="with --decode-roofline: the batch sizes to time")
    ap.add_argument("--decode-context", type=int, default=1024, help="with --decode-roofline: tokens of context")
    args = ap.parse_args(argv)

    from engine import LLM, SamplingParams
    from engine.model_setup import ModelSetup
    from engine.config import EngineConfig

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          attention_backend=args.attention_backend, tensor_parallel_size=args.tensor_parallel_size,
                          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                          pipeline_parallel_size=args.pipeline_parallel_size,
                          enable_expert_parallel=args.enable_expert_parallel,
                          pipeline_layer_split=args.pipeline_layer_split,
                          async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling])
    setup = ModelSetup.from_config(config)
    vocab = setup.hf_config.vocab_size
    workloads = {name: load_workload(name, vocab, args.limit) for name in args.workloads}
    baselines = {}
    if args.hf_baseline:  # first, while the GPU is still free of our KV cache
        for name, (prompts, out_lens, _) in workloads.items():
            n = min(args.hf_baseline, len(prompts))
            bs = 1 if name == "W1" else args.hf_batch_size
            baselines[name] = run_transformers(setup.model_dir, prompts[:n], out_lens[:n], bs, setup.dtype,
                                               setup.device)
            print(f"{name}: transformers {baselines[name]['output_tok_s']:.1f} output tok/s on {n} prompts", flush=True)
        _free_cuda()

    log = logging.getLogger("strata")  # the engine's own lines (GPU memory and KV cache sizing) on stderr
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    llm = LLM(**config.model_dump())
    start_s = time.perf_counter() - t0
    shard = llm.engine.executor.describe()
    kernels, graphs = shard["kernels"], shard["cuda_graphs"]
    print(f"engine ready in {start_s:.1f} s ({setup.device}, {setup.dtype}, {kernels} kernels, "
          f"CUDA graphs {'on' if graphs else 'off'})")
    warm = workloads.get("W1", load_workload("W1", vocab, None))[0]
    llm.generate([warm[0][:32]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)

    figures = {"engine_start_seconds": start_s}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(resolved_device=str(setup.device), resolved_dtype=str(setup.dtype),
                    max_num_batched_tokens_resolved=setup.max_num_batched_tokens,
                    max_num_seqs_resolved=setup.max_num_seqs,
                    kv_blocks=llm.engine.kv.pool.num_blocks, block_size=config.block_size, kernels=kernels,
                    kv_cache_gib=llm.engine.kv.pool.num_blocks * llm.engine.executor.kv_block_bytes() / 2 ** 30,
                    cuda_graphs=graphs, async_scheduling_resolved=llm.engine.async_scheduling,
                    one_shot_all_reduce=shard.get("one_shot_all_reduce"),
                    layer_ranges=getattr(llm.engine.executor, "layer_ranges", None))
    path = None
    for name, (prompts, out_lens, folded) in workloads.items():
        if args.cprofile and name == "W1":
            _cprofile(llm, prompts, out_lens)
        warm_up(llm, prompts, vocab)
        if args.torch_profile and name == "W1":
            llm.start_profile(str(args.torch_profile))
        res = run_engine(llm, prompts, out_lens)
        if args.torch_profile and name == "W1":
            print("torch.profiler traces:", *llm.stop_profile())
        if name == "W1":
            res["ms_per_token"] = 1000 * res["seconds"] / res["output_tokens"]
        if name in baselines:
            res["transformers"] = baselines[name]
            res["speedup_vs_transformers"] = res["output_tok_s"] / baselines[name]["output_tok_s"]
        res.update(num_prompts=len(prompts), ids_folded_into_vocab=folded)
        if args.kernel_summary:
            res["kernels_profiled_run"] = _workload_kernels(llm, prompts, out_lens, vocab)
        figures[name] = res
        line = (f"{name}: {res['output_tok_s']:.1f} output tok/s over {len(prompts)} prompts ({res['steps']} steps, "
                f"the driver waited on the devices {res['driver_waiting_s']:.1f} of {res['seconds']:.1f} s)")
        if "speedup_vs_transformers" in res:
            line += f" ({res['speedup_vs_transformers']:.2f}x transformers)"
        print(line, flush=True)
        print(f"  host ms a step: {res['host_ms_per_step']}", flush=True)
        if res.get("cuda_allocator"):
            print(f"  CUDA allocator during the run: {res['cuda_allocator']}", flush=True)
        path = write_result("throughput", settings, figures, args.out_dir, path)  # rewritten after each workload
    if args.decode_roofline:
        from benchmarks.kernel_bench import copy_bandwidth

        for batch in args.decode_batch:
            ctx = args.decode_context
            figures[f"decode_b{batch}_ctx{ctx}"] = res = decode_roofline(llm, batch, ctx, 32, copy_bandwidth(),
                                                                         args.profile)
            print(f"decode at batch {batch}, {ctx} tokens of context: {res['ms_per_step']:.2f} ms per step, "
                  f"{100 * res['fraction_of_roofline']:.0f}% of the {res['roofline_ms']:.2f} ms roofline")
            path = write_result("throughput", settings, figures, args.out_dir, path)
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
