"""The CUDA path: the same numbers as the CPU, memory on the device, bf16 autocast, and no host
synchronisation inside the training steps. These run only where CUDA is (``perf/gpu_check.sh`` runs them
with the speed benchmarks on a GPU machine); on a CPU-only machine they are reported as skipped."""
import warnings

import numpy as np
import pytest
import torch

from clbench import make_strategy, make_stream, run
from clbench.batched import Member, run_batched

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_stream(seed=0, **kw):
    return make_stream("teacher-student", rho_a=0.5, rho_b=0.5, input_dim=100, latent_dim=8, output_dim=4,
                       mode="sampled", samples=512, seed=seed, **kw)


def test_engine_on_cuda_gives_the_cpu_numbers():
    for name in ("finetune", "ewc-diag", "replay"):
        cpu = run(small_stream(), make_strategy(name, epochs=2), device="cpu", seed=0, progress=False)
        gpu = run(small_stream(), make_strategy(name, epochs=2), device="cuda", seed=0, progress=False)
        np.testing.assert_allclose(gpu.R, cpu.R, atol=1e-3, err_msg=name)


def test_batched_on_cuda_equals_the_engine_on_cuda():
    members = [Member(small_stream(seed), make_strategy("ewc-diag", epochs=2, strength=s), seed)
               for seed, s in ((0, 0.1), (1, 1.0), (2, 10.0))]
    batched = run_batched(members, device="cuda")
    for m, got in zip(members, batched):
        want = run(small_stream(m.seed), make_strategy("ewc-diag", epochs=2, strength=m.strategy.strength),
                   device="cuda", seed=m.seed, progress=False)
        np.testing.assert_allclose(got.R, want.R, atol=1e-4)


def test_memory_stays_on_the_device():
    strategy = make_strategy("der++", epochs=1, buffer_size=64)
    run(small_stream(), strategy, device="cuda", seed=0, progress=False)
    assert all(t.is_cuda for t in strategy.buffer.data.values())


def test_bf16_autocast_trains_close_to_fp32():
    fp32 = run(small_stream(), make_strategy("finetune", epochs=3), device="cuda", seed=0, progress=False)
    bf16 = run(small_stream(), make_strategy("finetune", epochs=3), device="cuda", seed=0, progress=False,
               precision="bf16")
    assert bf16.config["precision"] == "bf16"
    np.testing.assert_allclose(bf16.R, fp32.R, atol=0.05)


def syncs(epochs: int, batch_size: int) -> int:
    """Host synchronisations torch reports during one run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(small_stream(), make_strategy("finetune", epochs=epochs, batch_size=batch_size), device="cuda",
                seed=0, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_no_host_synchronisation_inside_the_training_steps():
    # four times the steps (a quarter of the batch size) must not add synchronisations: the hot loop has none,
    # only the once-an-epoch loss read and the evaluations synchronise
    assert syncs(epochs=2, batch_size=128) == syncs(epochs=2, batch_size=32)
