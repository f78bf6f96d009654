"""Batched runs give every member the R of its separate run (the slow obvious reference)."""
import re

import numpy as np
import pytest
import torch

from clbench import ClbenchError, make_strategy, make_stream, run
from clbench.batched import Member, batchable, run_batched

GRID = [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]


def small_ts(rho_a, rho_b, seed, **kw):
    return make_stream("teacher-student", rho_a=rho_a, rho_b=rho_b, input_dim=200, latent_dim=10, output_dim=4,
                       seed=seed, **kw)


def close(a, b, atol=1e-4):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], atol) for k in a)
    if isinstance(a, list):  # e.g. extra["raw"], the unscored matrix
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, atol) for x, y in zip(a, b))
    return a == pytest.approx(b, abs=atol) if isinstance(a, float) else a == b


def check(name, args_per_member, stream_kw=None, atol=1e-4, model_name=None, model_args=None, epochs=10, tasks=2,
          curve_rtol=1e-3):
    """Members differ in grid point, seed and the strategy's numeric arguments."""
    stream_kw = dict(stream_kw or {}, tasks=tasks)
    specs = [(a, b, seed, args) for (a, b), seed, args in zip(GRID * 3, [0, 1, 2] * 3, args_per_member)]
    members = [Member(small_ts(a, b, seed, **stream_kw), make_strategy(name, epochs=epochs, **args), seed)
               for a, b, seed, args in specs]
    batched = run_batched(members, device="cpu", model_name=model_name, model_args=model_args)
    singles = [run(small_ts(a, b, seed, **stream_kw), make_strategy(name, epochs=epochs, **args), device="cpu",
                   seed=seed, progress=False, model_name=model_name, model_args=model_args)
               for a, b, seed, args in specs]
    for got, want in zip(batched, singles):
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(got.R, want.R, atol=atol)
        if curve_rtol is not None:  # per task, per epoch
            np.testing.assert_allclose(got.loss_curves, want.loss_curves, rtol=curve_rtol, atol=atol)
        assert got.extra.get("batched_members") == len(members)
        assert close({k: v for k, v in got.extra.items() if k != "batched_members"}, want.extra, atol)
        assert got.config == want.config
    assert len({round(r.metrics["acc"], 6) for r in batched}) > 1  # the members really differ
    return batched, singles


def test_finetune_and_joint_exact_mode():
    check("finetune", [{}] * 3)
    check("joint", [{}] * 3, tasks=3)


def test_l2_and_ewc_diag_with_different_strengths():
    check("l2", [{"strength": s} for s in (0.01, 0.1, 1.0)])
    check("ewc-diag", [{"strength": s, "form": "online", "decay": d} for s, d in ((0.1, 1.0), (1.0, 0.5), (10.0, 1.0))],
          tasks=3)
    # per-task: one penalty per finished task, held as one quadratic plus a constant (loss curves compared)
    check("ewc-diag", [{"strength": s} for s in (0.1, 1.0, 10.0)], tasks=4)


def test_what_runs_unbatched_says_why():
    stream = small_ts(0.5, 0.5, 0, tasks=3)
    assert "per-task ewc-full" in batchable(stream, make_strategy("ewc-full"))
    assert batchable(stream, make_strategy("ewc-full", form="online")) is None
    assert batchable(stream, make_strategy("ewc-diag")) is None
    assert batchable(small_ts(0.5, 0.5, 0), make_strategy("ewc-full")) is None
    assert "anchor_initial" in batchable(stream, make_strategy("l2", anchor_initial=True))


def test_ewc_full_exact_and_kfac():
    # linear student: the factored exact Fisher computed in batch; MLP: each member's own Fisher, stacked
    online = {"form": "online"}
    check("ewc-full", [{"strength": s, **online} for s in (0.1, 1.0, 10.0)], tasks=3)
    mlp = dict(model_name="mlp", model_args={"widths": (8,)}, stream_kw={"mode": "sampled", "samples": 100}, epochs=3)
    check("ewc-full", [{"strength": s, "fisher_samples": 20, **online} for s in (0.1, 1.0, 10.0)], tasks=3, **mlp)
    check("ewc-diag", [{"strength": s, **online} for s in (0.1, 1.0, 10.0)], tasks=3, **mlp)
    check("ewc-full", [{"strength": s, "fisher_form": "kfac"} for s in (0.1, 1.0, 10.0)],
          model_name="mlp", model_args={"widths": (16,)}, stream_kw={"mode": "sampled", "samples": 200}, epochs=3)


def test_ewc_diag_fisher_of_a_classifier_computed_in_batch(tmp_path):
    """Cross-entropy MLP on permuted images (IDX files written here): the stacked true and empirical
    diagonal Fisher equal each member's own (fisher.diagonal), so R matches separate runs."""
    from fake_data import write_idx_dataset

    root = str(write_idx_dataset(tmp_path / "m", train=300, test=100))
    streams = {seed: make_stream("permuted-mnist", tasks=3, root=root, seed=seed) for seed in (0, 1)}
    kw = {"model_args": {"widths": (16,)}}
    for fisher, form in (("true", {"form": "online", "decay": 0.5}), ("empirical", {"form": "per-task"})):
        specs = [(seed, {"strength": s, "fisher": fisher, "fisher_samples": 200, **form, "epochs": 2, "lr": 0.05})
                 for seed in (0, 1) for s in (1.0, 30.0)]
        batched = run_batched([Member(streams[seed], make_strategy("ewc-diag", **args), seed) for seed, args in specs],
                              device="cpu", **kw)
        for (seed, args), got in zip(specs, batched):
            want = run(streams[seed], make_strategy("ewc-diag", **args), device="cpu", seed=seed, progress=False, **kw)
            np.testing.assert_allclose(got.R, want.R, atol=0.02)  # accuracy on 100 test images: one flip is 0.01
            np.testing.assert_allclose(got.loss_curves, want.loss_curves, rtol=1e-3)
        assert len({round(r.metrics["acc"], 6) for r in batched}) > 1


def test_true_fisher_in_closed_form_equals_one_backward_per_class(tmp_path, monkeypatch):
    """The stacked diagonal true Fisher of a chain of Linear layers and activations in closed form (every
    class's output gradient carried down at once) equals the per-class sum of squared gradients it replaces:
    one, two and three Linear layers, cross-entropy with one head and with task heads, ReLU and tanh, and the
    Gaussian (MSE) Fisher."""
    from fake_data import write_idx_dataset

    import clbench.batched.fisher as batched

    closed_form, per_class = batched.true_fisher_scales, batched.diagonal_fisher
    used = []

    def counted(*args):
        scales = closed_form(*args)
        used.append(scales is not None)
        return scales

    def both(g, i, batch_size=512):
        monkeypatch.setattr(batched, "true_fisher_scales", counted)
        fast = per_class(g, i, batch_size)
        monkeypatch.setattr(batched, "true_fisher_scales", lambda *args: None)
        slow = per_class(g, i, batch_size)
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-7)
        assert fast.abs().max() > 0
        return fast

    monkeypatch.setattr(batched, "diagonal_fisher", both)
    root = str(write_idx_dataset(tmp_path / "m", train=300, test=100))
    cases = [(make_stream("permuted-mnist", tasks=2, root=root), {"widths": (16,)}),
             (make_stream("split-mnist", scenario="task", root=root), {"widths": (16,), "activation": "tanh"}),
             (small_ts(0.5, 0.5, 0, mode="sampled", samples=200), {"widths": (16,)}),
             (small_ts(0.5, 0.5, 0), None),
             (make_stream("permuted-mnist", tasks=2, root=root), {"widths": (16, 12)}),
             (make_stream("split-mnist", scenario="task", root=root), {"widths": (16, 12), "activation": "tanh"}),
             (small_ts(0.5, 0.5, 0, mode="sampled", samples=200), {"widths": (16, 12)})]
    for stream, model_args in cases:
        kw = {"model_name": "mlp", "model_args": model_args} if model_args else {}
        members = [Member(stream, make_strategy("ewc-diag", strength=s, epochs=1, fisher_samples=150), 0)
                   for s in (1.0, 3.0)]
        assert not any(isinstance(r, Exception) for r in run_batched(members, device="cpu", **kw))
    assert len(used) >= len(cases) and all(used)  # the closed form served every case


def test_lwf_distillation_with_different_alphas_and_temperatures(tmp_path):
    from fake_data import write_idx_dataset

    check("lwf", [{"alpha": a} for a in (0.3, 1.0, 3.0)], tasks=3)  # regression: the MSE to the old outputs
    root = str(write_idx_dataset(tmp_path / "m", train=300, test=100))
    for stream in (make_stream("permuted-mnist", tasks=3, root=root), make_stream("split-mnist", root=root)):
        specs = [({"alpha": a, "temperature": T, "epochs": 2}, seed) for a, T in ((0.5, 1.0), (2.0, 2.0), (1.0, 4.0))
                 for seed in (0, 1)]
        kw = {"model_args": {"widths": (16,)}}
        batched = run_batched([Member(stream, make_strategy("lwf", **args), seed) for args, seed in specs],
                              device="cpu", **kw)
        for (args, seed), got in zip(specs, batched):
            want = run(stream, make_strategy("lwf", **args), device="cpu", seed=seed, progress=False, **kw)
            np.testing.assert_allclose(got.R, want.R, atol=0.02)  # 100 test images: one flip is 0.01
            np.testing.assert_allclose(got.loss_curves, want.loss_curves, rtol=1e-3)


def test_gating_strategies_with_different_alphas():
    check("activity-gating", [{"alpha": a} for a in (0.2, 0.5, 0.8)])
    check("adaptive-gating", [{"alpha": a} for a in (0.2, 0.5, 0.8)], tasks=3)
    check("plasticity-gating", [{"alpha": a} for a in (0.2, 0.5, 0.8)])


def test_si_and_replay_sampled_minibatches():
    kw = dict(model_name="mlp", model_args={"widths": (16,)}, stream_kw={"mode": "sampled", "samples": 200},
              epochs=3)
    check("si", [{"c": c} for c in (0.01, 0.1, 1.0)], **kw)
    check("replay", [{"buffer_size": 1000}] * 3, tasks=3, curve_rtol=1e-2, **kw)  # never full: picks only
    # a full reservoir replaces samples at random slots (the later sample of a collided slot wins in both loops)
    check("replay", [{"buffer_size": 50}] * 3, tasks=3, **kw)


def test_members_with_equal_inputs_share_one_copy_and_one_matmul():
    """Members whose inputs are equal read one stacked copy: separate streams of one seed and rho_a (any rho_b)
    hold equal inputs, and members of one seed draw the same batches; R is still each separate run's."""
    from clbench.batched import Sharing
    from clbench.batched.inputs import distinct_inputs

    exact = [(small_ts(0.5, b, 0), "activity-gating", {"alpha": a}, 0)  # a gate on the shared input layer
             for b, a in ((0.0, 0.2), (0.3, 0.4), (0.6, 0.6), (1.0, 0.8))]
    sampled = {seed: small_ts(0.5, 0.5, seed, mode="sampled", samples=200) for seed in (0, 1)}
    minibatch = ([(small_ts(0.5, b, 0, mode="sampled", samples=200), "l2", {"strength": 0.3}, 0) for b in (0.0, 0.5)]
                 + [(sampled[seed], "l2", {"strength": s}, seed) for s in (0.1, 1.0, 3.0) for seed in (0, 1)])
    mlp = {"model_name": "mlp", "model_args": {"widths": (16,)}}
    for specs, kw, epochs in ((exact, {}, 10), (minibatch, mlp, 3)):
        members = [Member(st, make_strategy(name, epochs=epochs, **args), seed) for st, name, args, seed in specs]
        for j in range(2):
            rows, train, test = distinct_inputs(members, [m.stream.tasks for m in members], j)
            assert len(train) == len(test) == len({seed for *_, seed in specs}) == len(set(rows))
            assert Sharing.of(rows, "cpu") is not None
        batched = run_batched(members, device="cpu", **kw)
        for (st, name, args, seed), got in zip(specs, batched):
            want = run(st, make_strategy(name, epochs=epochs, **args), device="cpu", seed=seed, progress=False, **kw)
            np.testing.assert_allclose(got.R, want.R, atol=1e-4)
        assert len({round(r.metrics["acc"], 6) for r in batched}) == len(specs)


def test_permuted_images_held_once_per_seed_and_orders_folded_into_the_first_layer(tmp_path):
    """Permuted-MNIST members keep the stored images once per distinct content (the seeds' training subsets
    differ, the test set is shared), build training batches with each row's pixel order and evaluate with the
    order (and an input gate) folded into the first layer's weights; R is still each separate run's."""
    from fake_data import write_idx_dataset

    from clbench.batched.inputs import PermutedInputs, distinct_inputs

    root = str(write_idx_dataset(tmp_path / "m", train=300, test=100))
    streams = {(a, b, seed): make_stream("permuted-mnist", tasks=3, rho_a=a, rho_b=b, train_samples=200, root=root,
                                         seed=seed) for a in (0.0, 0.5) for b in (0.0, 1.0) for seed in (0, 1)}
    specs = [(stream, key[2], name, args) for key, stream in streams.items()
             for name, args in (("finetune", {}), ("activity-gating", {"alpha": 0.6}))]
    members = [Member(st, make_strategy(name, epochs=2, lr=0.05, **args), seed) for st, seed, name, args in specs]
    for j, distinct_rows in ((0, 2), (1, 4)):  # task 1: the images as stored; then one order per seed and rho_a
        rows, train, test = distinct_inputs(members, [m.stream.tasks for m in members], j)
        assert isinstance(train, PermutedInputs) and isinstance(test, PermutedInputs)
        assert len(train) == len(test) == len(set(rows)) == distinct_rows
        assert len(train.base) == 2 and len(test.base) == 1
        want = members[-1].stream.tasks[j].inputs(members[-1].stream.tasks[j].train_x[:5])
        assert torch.equal(train.take(torch.tensor([rows[-1]]), torch.arange(5)[None])[0], want)
    # the memory estimate counts a stream's images once (uint8 as stored, the test set also in float)
    from clbench.batched.group import member_bytes
    from clbench.models.networks import build_model

    model = build_model("mlp", (1, 28, 28), 10, widths=(16,))
    first, held = member_bytes(members[0], model, set())
    again, _ = member_bytes(members[1], model, held)  # another strategy on the same stream
    assert members[1].stream is members[0].stream
    assert first - again == 3 * 4 * (200 + 100) + 200 * 784 + 100 * 784 * 5
    kw = {"model_args": {"widths": (16,)}}
    batched = run_batched(members, device="cpu", **kw)
    for (st, seed, name, args), got in zip(specs, batched):
        want = run(st, make_strategy(name, epochs=2, lr=0.05, **args), device="cpu", seed=seed, progress=False, **kw)
        np.testing.assert_allclose(got.R, want.R, atol=0.011)  # 100 test images: a rounding flip is 0.01
        np.testing.assert_allclose(got.loss_curves, want.loss_curves, rtol=1e-4)
    assert len({round(r.metrics["acc"], 6) for r in batched}) > len(specs) // 2


def test_unsupported_strategies_say_so():
    stream = small_ts(0.5, 0.5, 0)
    assert "no batched form" in batchable(stream, make_strategy("iru"))
    with pytest.raises(ClbenchError, match="cannot run batched"):
        run_batched([Member(stream, make_strategy("iru"), 0)], device="cpu")


def test_sweep_batches_cells_into_the_same_records_and_resumes(tmp_path):
    from clbench.experiments import sweep
    from clbench.experiments.batching import plan
    from clbench.experiments.store import Store

    spec = sweep.inline_spec(["teacher-student"], {"input_dim": 100, "latent_dim": 8, "rho_a": (0.0, 0.5, 1.0)},
                             ["l2", "activity-gating"], {"epochs": 10}, [0, 1])
    spec["strategy"][1]["args"]["alpha"] = [0.3, 0.6]
    cells = sweep.expand(spec)
    batches = plan(cells, "auto", jobs=2)
    assert sorted(len(b) for b in batches) == [3, 3, 6, 6]  # per strategy, split for two workers
    assert all(len({c["strategy"] for c in b}) == 1 for b in batches)
    off, auto = Store(tmp_path / "off"), Store(tmp_path / "auto")
    sweep.run_sweep(cells, off, progress=False, batch="off")
    sweep.run_sweep(cells[:4], auto, progress=False, batch=2)  # a first part, then resume
    assert sweep.run_sweep(cells, auto, progress=False, batch="auto") == (len(cells) - 4, 4)
    want = {r["id"]: r for r in off.records()}
    got = {r["id"]: r for r in auto.records()}
    assert want.keys() == got.keys() and len(got) == len(cells)
    for key, record in got.items():
        assert set(record) == set(want[key])
        assert record["cell"] == want[key]["cell"] and record["config"] == want[key]["config"]
        np.testing.assert_allclose(record["R"], want[key]["R"], atol=1e-4)
    assert {r["extra"].get("batched_members") for r in got.values()} == {2, 12}  # batch=2, then the rest
    with pytest.raises(ClbenchError, match="--batch takes auto, off or a positive integer"):
        sweep.run_sweep(cells, auto, progress=False, batch="0")


def test_a_batch_that_cannot_run_batched_says_why_and_runs_its_cells_alone(monkeypatch, capsys):
    from clbench.experiments import batching, sweep

    spec = sweep.inline_spec(["teacher-student"], {"input_dim": 50, "latent_dim": 4}, ["l2"], {"epochs": 3}, [0, 1])
    cells = sweep.expand(spec)
    want = [record["R"] for _, record, _ in batching.run_cells(cells, "cpu")]

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a batched form")

    monkeypatch.setattr(batching, "run_batched", broken)
    got = batching.run_cells(cells, "cpu")
    assert [error for _, _, error in got] == [None, None]
    assert all("batched_members" not in record["extra"] for _, record, _ in got)  # each ran alone
    for R, (_, record, _) in zip(want, got):
        np.testing.assert_allclose(record["R"], R, atol=1e-4)
    err = capsys.readouterr().err
    assert "2 l2 run(s) could not train as one batched model (RuntimeError: a bug in a batched form)" in err


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_members_at_different_learning_rates_share_one_batch(optimizer):
    lrs = (0.01, 0.03, 0.1) if optimizer == "sgd" else (0.001, 0.003, 0.01)
    batched, _ = check("ewc-diag", [{"strength": s, "lr": lr, "optimizer": optimizer}
                                    for s, lr in zip((0.1, 1.0, 10.0), lrs * 3)], epochs=4)
    assert {r.config["lr"] for r in batched} == set(lrs)


@pytest.mark.parametrize("name,args", [("finetune", {}), ("ewc-diag", {"strength": 3.0}), ("replay", {"buffer_size": 40}),
                                       ("lwf", {"alpha": 1.0})])
def test_final_only_skips_the_middle_rows_and_changes_nothing_else(tmp_path, name, args):
    """``final_only`` (what a tuning trial scored by final ACC runs) evaluates rows 0 and T only, in both loops;
    training, and so the last row and ACC, are those of the full run (evaluation draws no random numbers)."""
    from fake_data import write_idx_dataset

    root = str(write_idx_dataset(tmp_path / "m", train=300, test=100))
    stream = make_stream("permuted-mnist", tasks=3, root=root)
    kw = {"model_args": {"widths": (16,)}, "device": "cpu"}
    full = run(stream, make_strategy(name, epochs=2, lr=0.05, **args), seed=1, progress=False, **kw)
    ends = run(stream, make_strategy(name, epochs=2, lr=0.05, **args), seed=1, progress=False, final_only=True, **kw)
    R, E = np.array(full.R), np.array(ends.R)
    assert np.isnan(E[1:-1]).all() and not np.isnan(E[[0, -1]]).any()
    np.testing.assert_array_equal(E[[0, -1]], R[[0, -1]])
    assert ends.metrics["acc"] == full.metrics["acc"] and np.isnan(ends.metrics["bwt"])
    assert ends.loss_curves == full.loss_curves
    batched = run_batched([Member(stream, make_strategy(name, epochs=2, lr=lr, **args), seed=1) for lr in (0.05, 0.1)],
                          final_only=True, **kw)
    B = np.array(batched[0].R)
    assert np.isnan(B[1:-1]).all()
    np.testing.assert_allclose(B[[0, -1]], R[[0, -1]], atol=0.02)  # 100 test images: one flip is 0.01
    assert batched[0].metrics["acc"] == pytest.approx(full.metrics["acc"], abs=0.02)


def _group_sizes(monkeypatch):
    """The size of every Group run_batched builds, and the before_task hooks it runs, as they happen."""
    from clbench.batched import group

    sizes, hooks, init, hook = [], [], group.Group.__init__, group.Group.hook

    def counting_init(self, members, *args):
        sizes.append(len(members))
        init(self, members, *args)

    def counting_hook(self, b, name, *args):
        hooks.append(name)
        return hook(self, b, name, *args)

    monkeypatch.setattr(group.Group, "__init__", counting_init)
    monkeypatch.setattr(group.Group, "hook", counting_hook)
    return sizes, hooks


@pytest.mark.parametrize("name,wild,tame", [("ewc-diag", {"strength": 1e9}, {"strength": 1.0}),
                                            ("finetune", {"lr": 1e9}, {"lr": 0.05}),
                                            ("lwf", {"lr": 1e9, "alpha": 1.0}, {"lr": 0.05, "alpha": 1.0}),
                                            ("activity-gating", {"lr": 1e9, "alpha": 0.5}, {"lr": 0.05, "alpha": 0.5}),
                                            ("plasticity-gating", {"lr": 1e9}, {"lr": 0.05}),
                                            ("replay", {"lr": 1e9, "buffer_size": 40}, {"lr": 0.05, "buffer_size": 40})])
def test_diverged_members_leave_the_batch_at_the_next_task_and_the_rest_do_not_change(monkeypatch, name, wild, tame):
    """A member that diverges stops there, as its own run does; the others go on as a smaller batch (when the
    strategy's batched form keeps its state in the members) with the R of their separate runs."""
    sizes, _ = _group_sizes(monkeypatch)
    args = [wild, tame, wild, tame]
    members = [Member(small_ts(0.5, 0.5, seed, tasks=4), make_strategy(name, epochs=3, **a), seed)
               for seed, a in enumerate(args)]
    batched = run_batched(members, device="cpu")
    for seed, (got, a) in enumerate(zip(batched, args)):
        alone = None
        try:
            alone = run(small_ts(0.5, 0.5, seed, tasks=4), make_strategy(name, epochs=3, **a), device="cpu", seed=seed,
                        progress=False)
        except ClbenchError as e:
            assert type(got) is type(e) and str(got) == str(e)  # the same task, the same reason
            np.testing.assert_allclose(got.partial.R, e.partial.R, rtol=1e-4, atol=1e-4)
        if alone is not None:
            assert not isinstance(got, Exception), got
            np.testing.assert_allclose(got.R, alone.R, atol=1e-4)
            np.testing.assert_allclose(got.loss_curves, alone.loss_curves, rtol=1e-3, atol=1e-4)
    assert [isinstance(r, Exception) for r in batched] == [True, False, True, False]
    assert sizes == ([4] if name == "replay" else [4, 2])  # replay's batched buffer lives in its adapter


def test_a_batch_whose_members_all_diverged_stops(monkeypatch):
    sizes, hooks = _group_sizes(monkeypatch)
    members = [Member(small_ts(0.5, 0.5, seed, tasks=4), make_strategy("ewc-diag", epochs=3, strength=s), seed)
               for seed, s in enumerate((1e9, 1e10))]
    batched = run_batched(members, device="cpu")
    last = max(int(re.search(r"diverged on task (\d)", str(r)).group(1)) for r in batched)
    assert last < 4 and sizes == [2]
    assert hooks.count("before_task") == 2 * last  # no task after the divergence is trained
