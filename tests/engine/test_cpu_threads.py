"""A CPU engine inside a Ray actor (a Serve replica) uses the machine's cores, not the one thread Ray gives it."""
import os

import ray


@ray.remote(num_cpus=1)
class EngineProbe:
    def threads(self, model: str, **options) -> tuple[str | None, int, int]:
        import torch

        from engine import LLM, SamplingParams

        omp = os.environ.get("OMP_NUM_THREADS")
        before = torch.get_num_threads()
        llm = LLM(model, device="cpu", num_kv_blocks=32, **options)
        out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2
        return omp, before, llm.engine.executor.describe()["cpu_threads"]


def test_engine_in_a_one_cpu_actor_takes_every_core(local_ray, tiny_model_dir):
    cores = len(os.sched_getaffinity(0))
    probe = EngineProbe.remote()
    omp, before, threads = ray.get(probe.threads.remote(str(tiny_model_dir("llama"))))
    assert (omp, before) == ("1", 1)  # what Ray sets up for a num_cpus=1 actor
    assert threads == cores


def test_cpu_threads_option_sets_the_count(local_ray, tiny_model_dir):
    probe = EngineProbe.remote()
    _, _, threads = ray.get(probe.threads.remote(str(tiny_model_dir("llama")), cpu_threads=3))
    assert threads == 3
