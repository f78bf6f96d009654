"""Adaptive and plasticity gating against Hiratani's findings; SI, LwF and replay against finetune."""
import numpy as np
import pytest
import torch
from fake_data import write_idx_dataset

from clbench import ClbenchError, make_strategy, make_stream, run

GRID = [(a, b) for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0)]


def grid_means(name, **args):
    runs = [run(make_stream("teacher-student", rho_a=a, rho_b=b), make_strategy(name, **args), device="cpu",
                progress=False) for a, b in GRID]
    return ({k: np.mean([r.metrics[k] for r in runs]) for k in ("transfer", "retention")}, runs)


def test_adaptive_gating_transfers_more_than_random_gating_at_comparable_retention():
    random_gates, _ = grid_means("activity-gating", alpha=0.2)
    adaptive, runs = grid_means("adaptive-gating", alpha=0.2)
    assert adaptive["transfer"] > random_gates["transfer"] + 0.05
    assert adaptive["retention"] > random_gates["retention"] - 0.05
    reuse = [r.extra["gate_reuse_probability"]["1"] for r in runs]
    assert reuse[GRID.index((1.0, 1.0))] > 0.5 and reuse[GRID.index((0.0, 0.0))] == 0.0


def test_plasticity_gating_behaves_like_vanilla_in_the_overparameterised_limit():
    plastic, _ = grid_means("plasticity-gating", alpha=0.5)
    vanilla, _ = grid_means("finetune")
    assert plastic["transfer"] == pytest.approx(vanilla["transfer"], abs=0.03)
    assert plastic["retention"] == pytest.approx(vanilla["retention"], abs=0.03)


def test_plasticity_gating_freezes_the_other_synapses():
    s = make_stream("teacher-student", tasks=1, input_dim=200, latent_dim=10, output_dim=5)
    strategy = make_strategy("plasticity-gating", alpha=0.25, epochs=5)
    run(s, strategy, device="cpu", progress=False)
    W = strategy.model[1].weight.detach()
    changed = (W != 0).any(0)  # started at zero
    assert int(changed.sum()) == 50 and torch.equal(changed, strategy.masks[0].bool())
    with pytest.raises(ClbenchError, match="alpha must be > 0"):
        make_strategy("plasticity-gating", alpha=0.0)


def _forgetting_stream(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    root = str(write_idx_dataset(tmp_path / "m", train=1500, test=500))
    return lambda: make_stream("split-mnist", scenario="class", root=root)


def test_replay_forgets_less_than_finetune_class_incremental(tmp_path, monkeypatch):
    stream = _forgetting_stream(tmp_path, monkeypatch)
    common = dict(epochs=2, lr=0.05)
    fine = run(stream(), make_strategy("finetune", **common), device="cpu", seed=1, progress=False)
    replay = run(stream(), make_strategy("replay", buffer_size=200, **common), device="cpu", seed=1, progress=False)
    assert fine.metrics["forgetting"] > 0.5  # class-incremental finetune forgets almost everything
    assert replay.metrics["forgetting"] < fine.metrics["forgetting"] - 0.2
    assert replay.metrics["acc"] > fine.metrics["acc"] + 0.2
    assert replay.extra["samples_seen"] == 2 * 1500


@pytest.mark.parametrize("name, args, gain", [("si", {"c": 100.0}, 0.05), ("lwf", {"alpha": 1.0}, 0.2)])
def test_si_and_lwf_retain_more_than_finetune(name, args, gain):
    """Teacher-student, rho_a = 0.5, rho_b = 0: finetune loses about a third of task 1."""
    stream = lambda: make_stream("teacher-student", rho_a=0.5, rho_b=0.0)  # noqa: E731
    fine = run(stream(), make_strategy("finetune"), device="cpu", progress=False).metrics
    other = run(stream(), make_strategy(name, **args), device="cpu", progress=False).metrics
    assert other["retention"] > fine["retention"] + gain
    assert other["transfer"] == pytest.approx(fine["transfer"], abs=1e-6)  # same training on task 1


def test_replay_reservoir_keeps_a_uniform_sample():
    from clbench.strategies.replay import Replay

    replay = Replay(buffer_size=100)
    task = type("T", (), {"id": 0})()
    for start in range(0, 10000, 50):
        x = torch.arange(start, start + 50, dtype=torch.float32).unsqueeze(1)
        replay.buffer.add(x=x, y=torch.zeros(50), task=task.id)
    kept = replay.buffer["x"][:, 0]
    assert len(replay.buffer) == 100 and len(kept.unique()) == 100
    assert 3500 < float(kept.mean()) < 6500  # uniform over 0..9999 has mean 4999.5, sd of the mean ~290


@pytest.mark.parametrize("name", ["activity-gating", "adaptive-gating"])
def test_gating_hidden_units_of_an_mlp(tmp_path, monkeypatch, name):
    """Gates first drawn during (inference-mode) evaluation must still work in training."""
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    stream = make_stream("permuted-mnist", tasks=2, root=str(write_idx_dataset(tmp_path / "m")))
    r = run(stream, make_strategy(name, alpha=0.5, layers="hidden", epochs=2), device="cpu", progress=False,
            model_args={"widths": (64, 64)})
    assert min(r.R[1][0], r.R[2][1]) > 0.3  # chance is 0.1


def test_adaptive_gating_paper_rule_reuses_most_of_the_old_gate_at_high_similarity():
    """Hiratani's lst_acg.py rule: rho_g = clip(err(W=0) - err(old gate), 0, 1), close to the transfer (~0.9 here)."""
    runs = {}
    for sim in (0.95, 0.0):
        strategy = make_strategy("adaptive-gating", alpha=0.5, sampling="bernoulli", rescale=False)
        r = run(make_stream("teacher-student", rho_a=sim, rho_b=sim, seed=3), strategy, device="cpu", seed=3,
                progress=False)
        g1, g2 = strategy.gates[0][0], strategy.gates[1][0]
        runs[sim] = (r.extra["gate_reuse_probability"]["1"], float((g1 == g2).float().mean()), g1)
    reuse, same, g1 = runs[0.95]
    assert reuse > 0.75 and r.extra["rule"] == "paper"
    assert same > 0.85  # units kept (reuse) or re-drawn equal by chance ((1 - reuse) * 0.5)
    assert 0.4 < float(g1.mean()) < 0.6 and set(g1.unique().tolist()) == {0.0, 1.0}  # Bernoulli(0.5), no rescaling
    assert runs[0.0][0] == 0.0 and 0.35 < runs[0.0][1] < 0.65  # unrelated tasks: an independent gate


def test_adaptive_gating_rules_and_bad_input():
    stream = lambda: make_stream("teacher-student", rho_a=1.0, rho_b=1.0, input_dim=600, seed=1)  # noqa: E731
    reuse = {rule: run(stream(), make_strategy("adaptive-gating", alpha=0.5, rule=rule), device="cpu",
                       progress=False).extra["gate_reuse_probability"]["1"] for rule in ("paper", "normalised", "fresh")}
    assert reuse["normalised"] > 0.9 and reuse["paper"] > 0.8  # the same task again: the old gate is best
    assert reuse["fresh"] < reuse["paper"]  # a fresh gate with trained weights already helps: less reuse
    with pytest.raises(ClbenchError, match="rule must be one of paper"):
        make_strategy("adaptive-gating", rule="nope")
    with pytest.raises(ClbenchError, match="sampling must be"):
        make_strategy("activity-gating", sampling="poisson")
