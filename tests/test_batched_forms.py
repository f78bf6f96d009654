"""Every registered strategy either runs batched with the R of its separate engine run, or refuses with a reason.

The batched form of a strategy sits at the bottom of its own file (``@batched_form``); this test is driven by
the registry, so a new strategy is covered (or must state why it cannot batch) without touching it.
"""
import numpy as np
import pytest
from fake_data import write_idx_dataset

from clbench import make_strategy, make_stream, run
from clbench.batched import Member, adapter_for, batchable, run_batched
from clbench.core.registry import lookup, names

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return str(write_idx_dataset(tmp_path_factory.mktemp("idx"), train=240, test=80))


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    return str(write_idx_dataset(tmp_path_factory.mktemp("fashion-mnist"), train=240, test=80, seed=1))


def small_stream(cls, seed, root):
    """Teacher-student minibatches where the strategy takes a domain-incremental stream, else split MNIST."""
    if "domain" in cls.scenarios:
        return make_stream("teacher-student", rho_a=0.5, rho_b=0.5, input_dim=60, latent_dim=8, output_dim=4,
                           mode="sampled", samples=160, tasks=3, seed=seed)
    scenario = "class" if "class" in cls.scenarios else cls.scenarios[0]
    return make_stream("split-mnist", scenario=scenario, root=root, seed=seed)


@pytest.mark.parametrize("name", names("strategy"))
def test_batched_form_equals_the_engine_or_says_why_not(name, image_root):
    cls = lookup("strategy", name)
    streams = [small_stream(cls, seed, image_root) for seed in SEEDS]
    strategy_args = {"epochs": 2, "batch_size": 32}
    model = {"model_name": "mlp", "model_args": {"widths": (12,)}}
    reason = batchable(streams[0], make_strategy(name, **strategy_args))
    if reason is not None:
        assert isinstance(reason, str) and len(reason) > 10
        with pytest.raises(Exception, match="cannot run batched"):
            run_batched([Member(streams[0], make_strategy(name, **strategy_args), 0)], device="cpu", **model)
        return
    assert adapter_for(make_strategy(name)) is not None
    members = [Member(s, make_strategy(name, **strategy_args), seed) for s, seed in zip(streams, SEEDS)]
    batched = run_batched(members, device="cpu", **model)
    for stream, seed, got in zip(streams, SEEDS, batched):
        want = run(stream, make_strategy(name, **strategy_args), device="cpu", seed=seed, progress=False, **model)
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(got.R, want.R, atol=1e-4, err_msg=name)  # 80 test images: one flip is 0.0125
        np.testing.assert_allclose(got.loss_curves, want.loss_curves, rtol=1e-3, atol=1e-5, err_msg=name)


def test_batched_replay_keeps_the_later_sample_of_a_collided_slot_like_the_engine():
    """A small full reservoir takes many colliding slots per batch (buffer 8, batch 32): both loops keep the
    later sample of each collision, so their R agree to float rounding for every seed."""
    kw = {"model_name": "mlp", "model_args": {"widths": (12,)}}
    streams = [make_stream("teacher-student", input_dim=60, latent_dim=8, output_dim=4, mode="sampled", samples=320,
                           tasks=3, seed=seed) for seed in range(4)]
    args = {"buffer_size": 8, "epochs": 2, "batch_size": 32}
    batched = run_batched([Member(s, make_strategy("replay", **args), seed) for seed, s in enumerate(streams)],
                          device="cpu", **kw)
    for seed, (stream, got) in enumerate(zip(streams, batched)):
        want = run(stream, make_strategy("replay", **args), device="cpu", seed=seed, progress=False, **kw)
        np.testing.assert_allclose(got.R, want.R, atol=1e-5)
        np.testing.assert_allclose(got.loss_curves, want.loss_curves, rtol=1e-4, atol=1e-6)


# The replay-based forms on classification streams, with memories small enough that the reservoir fills in the
# first task and samples of one batch collide on slots; A-GEM's memory is smaller than its reference batch.
MEMORY_ARGS = {"replay": {"buffer_size": 24, "replay_batch_size": 16}, "der": {"buffer_size": 24},
               "der++": {"buffer_size": 24, "replay_batch_size": 16}, "er-ace": {"buffer_size": 24},
               "a-gem": {"memory_per_task": 8, "replay_batch_size": 12}}


def check_members(runs, **model):
    """Each run (stream, strategy name, arguments, seed) batched together: every member's R, loss curves and
    reported memory equal its separate engine run's."""
    batched = run_batched([Member(s, make_strategy(name, **args), seed) for s, name, args, seed in runs],
                          device="cpu", **model)
    for (stream, name, args, seed), got in zip(runs, batched):
        assert not isinstance(got, Exception), got
        assert got.extra["batched_members"] == len(runs)
        want = run(stream, make_strategy(name, **args), device="cpu", seed=seed, progress=False, **model)
        np.testing.assert_allclose(got.R, want.R, atol=1e-4)
        np.testing.assert_allclose(got.loss_curves, want.loss_curves, rtol=1e-3, atol=1e-5)
        for key in ("memory_samples", "samples_seen", "steps_projected"):
            assert got.extra.get(key) == want.extra.get(key), key
    return batched


@pytest.mark.parametrize("scenario", ["class", "task"])
@pytest.mark.parametrize("name", list(MEMORY_ARGS))
def test_replay_based_forms_equal_the_engine_on_split_images(name, scenario, fmnist_root):
    args = {"epochs": 2, "batch_size": 32, **MEMORY_ARGS[name]}
    runs = [(make_stream("split-fashion-mnist", scenario=scenario, root=fmnist_root, seed=seed), name, args, seed)
            for seed in SEEDS]
    batched = check_members(runs, model_name="mlp", model_args={"widths": (12,)})
    if name == "a-gem":  # the projection acted, on the same steps in both loops
        assert all(r.extra["steps_projected"] > 0 for r in batched)


def test_der_members_with_different_seeds_and_weights_batch_together(fmnist_root):
    """Two members share a seed (they draw alike) but differ in alpha and beta; the others differ in seed."""
    weights = [(0.3, 0.5, 0), (2.0, 0.1, 0), (1.0, 0.5, 1), (0.5, 1.5, 2)]
    runs = [(make_stream("split-fashion-mnist", root=fmnist_root, seed=seed), "der++",
             {"alpha": alpha, "beta": beta, "epochs": 2, "batch_size": 32, "buffer_size": 24}, seed)
            for alpha, beta, seed in weights]
    batched = check_members(runs, model_name="mlp", model_args={"widths": (12,)})
    assert not np.allclose(batched[0].R, batched[1].R)  # the weights matter


def test_der_forms_equal_the_engine_on_a_regression_stream():
    """On a regression stream the stored "logits" are the outputs and DER++'s term is the MSE."""
    for name in ("der", "der++"):
        args = {"epochs": 2, "batch_size": 32, "buffer_size": 20, "alpha": 0.7}
        runs = [(make_stream("teacher-student", input_dim=60, latent_dim=8, output_dim=4, mode="sampled", samples=96,
                             tasks=3, seed=seed), name, args, seed) for seed in SEEDS]
        check_members(runs, model_name="mlp", model_args={"widths": (12,)})
