"""Memory baselines (A-GEM, DER, DER++, ER-ACE) and the reservoir buffer they share, against slow references."""
import copy

import pytest
import torch
import torch.nn.functional as F
from fake_data import write_idx_dataset

from clbench import ClbenchError, make_strategy, make_stream, run
from clbench.core.buffer import ReservoirBuffer
from clbench.models.networks import build_model

MEMORY = ["a-gem", "der", "der++", "er-ace"]


@pytest.fixture
def fmnist_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    return str(write_idx_dataset(tmp_path / "fashion-mnist", train=1000, test=100))


def _set_up(name, stream, **args):
    torch.manual_seed(0)
    strategy = make_strategy(name, **args)
    strategy.setup(build_model("mlp", stream.input_shape, stream.num_outputs, widths=(16,)), stream)
    return strategy


def _batch(task, n=64, start=0):
    return task.inputs(task.train_x[start:start + n]), task.train_y[start:start + n]


# --- the buffer ---------------------------------------------------------------------------------------
def test_reservoir_keeps_every_sample_with_equal_probability():
    """Over 1000 seeded fills of 10 slots from 60 samples in uneven batches, each sample is kept in about
    1000 * 10/60 fills; a chi-square statistic on 59 degrees of freedom stays far below its 1e-6 tail (~125)."""
    counts = torch.zeros(60)
    for trial in range(1000):
        torch.manual_seed(trial)
        buffer = ReservoirBuffer(10)
        for start, stop in ((0, 4), (4, 17), (17, 18), (18, 43), (43, 60)):
            buffer.add(x=torch.arange(start, stop), task=0)
        assert len(buffer["x"].unique()) == 10  # no sample is kept twice
        counts[buffer["x"]] += 1
    expected = 1000 * 10 / 60
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 125
    assert float(counts[:10].mean()) == pytest.approx(expected, rel=0.1)  # the first to arrive are not favoured
    assert float(counts[-10:].mean()) == pytest.approx(expected, rel=0.1)  # nor the last


def test_reservoir_matches_one_by_one_sampling_and_the_later_sample_wins():
    """Every field written as Vitter's algorithm writes it sample by sample on the same draws."""
    buffer = ReservoirBuffer(8)
    seen, expected_x, expected_t = 0, torch.zeros(8), torch.zeros(8, dtype=torch.long)
    for batch, n in enumerate((5, 9, 300, 1, 40)):
        x = torch.arange(seen, seen + n, dtype=torch.float32)
        state = torch.get_rng_state()
        draws = (torch.rand(n) * torch.arange(seen + 1, seen + n + 1)).long()  # the draws add makes
        torch.set_rng_state(state)
        buffer.add(x=x, y=2 * x, task=batch)
        for i in range(n):
            slot = seen + i if seen + i < 8 else int(draws[i])
            if slot < 8:
                expected_x[slot], expected_t[slot] = x[i], batch
        seen += n
        if n == 300:
            kept = draws[draws < 8]
            assert len(kept) > len(kept.unique())  # slots drawn twice in this batch: the later one must win
        assert torch.equal(buffer["x"], expected_x[: len(buffer)]) and torch.equal(buffer["task"], expected_t[: len(buffer)])
        assert torch.equal(buffer["y"], 2 * buffer["x"])  # fields stay aligned
    assert buffer.seen == seen and len(buffer) == 8


def test_buffer_sample_without_replacement_and_field_check():
    torch.manual_seed(0)
    buffer = ReservoirBuffer(50)
    buffer.add(x=torch.arange(30.0), y=torch.arange(30))
    picked = buffer.sample(100, replace=False)
    assert sorted(picked["x"].tolist()) == list(range(30)) and torch.equal(picked["x"].long(), picked["y"])
    assert len(buffer.sample(100)["x"]) == 100  # with replacement: as many as asked
    with pytest.raises(ValueError, match="buffer fields"):
        buffer.add(x=torch.arange(3.0))


# --- A-GEM --------------------------------------------------------------------------------------------
def test_agem_projection_removes_the_conflict_and_keeps_g_otherwise():
    from clbench.strategies.agem import project

    torch.manual_seed(0)
    g, r = torch.randn(200, 50), torch.randn(200, 50)
    out = project(g, r)
    dots = (g * r).sum(1)
    assert (dots < 0).any() and (dots > 0).any()
    assert ((out * r).sum(1) >= -1e-5 * r.norm(dim=1) * g.norm(dim=1)).all()  # no conflict left
    assert torch.allclose((out * r).sum(1)[dots < 0], torch.zeros(int((dots < 0).sum())), atol=1e-4)  # on the edge
    assert torch.equal(out[dots >= 0], g[dots >= 0])  # untouched, bit for bit


@pytest.mark.parametrize("conflict", [True, False])
def test_agem_after_backward_equals_a_hand_projection(fmnist_root, conflict):
    """The memory holds the incoming task's samples: with their labels g and g_ref agree; relabelled to other
    classes, the memory's gradient opposes g."""
    stream = make_stream("split-fashion-mnist", root=fmnist_root)
    agem = _set_up("a-gem", stream, memory_per_task=40, replay_batch_size=32)
    agem.after_task(stream[1])
    if conflict:
        agem.memory.data["y"] -= 2
    x, y = _batch(stream[1])
    agem.training_loss(x, y, stream[1]).backward()
    params = list(agem.model.parameters())
    g = torch.cat([p.grad.reshape(-1) for p in params])
    reference = copy.deepcopy(agem.model)
    torch.manual_seed(7)
    agem.after_backward()
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.manual_seed(7)  # the same reference batch, by hand
    b = agem.memory.sample(32, replace=False)
    loss = F.cross_entropy(reference(b["x"]), b["y"])
    r = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(loss, list(reference.parameters()))])
    dot = float(g @ r)
    if conflict:
        assert dot < 0
        expected = g - dot / float(r @ r) * r
        assert torch.allclose(got, expected, atol=1e-6) and abs(float(got @ r)) < 1e-5 * float(r.norm() * g.norm())
    else:
        assert dot > 0 and torch.equal(got, g)
    assert int(agem.projected) == conflict


def test_agem_memory_is_per_task_and_buffer_size_splits_it(fmnist_root):
    stream = make_stream("split-fashion-mnist", root=fmnist_root)
    result = run(stream, make_strategy("a-gem", buffer_size=103, epochs=1), device="cpu", progress=False,
                 model_args={"widths": (16,)})
    assert result.extra["memory_per_task"] == 20 and result.extra["memory_samples"] == 100
    assert result.extra["steps_projected"] > 0
    agem = _set_up("a-gem", stream, memory_per_task=30)
    for task in stream.tasks[:3]:
        agem.after_task(task)
    assert torch.equal(agem.memory["task"].bincount(), torch.tensor([30, 30, 30]))  # every task keeps its share
    for t, task in enumerate(stream.tasks[:3]):
        assert set(agem.memory["y"][agem.memory["task"] == t].tolist()) <= set(task.classes)


# --- DER / DER++ --------------------------------------------------------------------------------------
def test_der_stores_the_logits_at_insertion_not_the_current_models(fmnist_root):
    stream = make_stream("split-fashion-mnist", root=fmnist_root)
    der = _set_up("der", stream, buffer_size=1000)  # never full: the first 32 stay in slots 0..31
    x, y = _batch(stream[0], 32)
    with torch.no_grad():
        at_insertion = der.model(x)
    der.training_loss(x, y, stream[0])
    optimizer = torch.optim.SGD(der.model.parameters(), lr=0.1)
    for step in range(20):  # train more, on other samples
        optimizer.zero_grad()
        der.training_loss(*_batch(stream[1], 32, 32 * (step % 6)), stream[1]).backward()
        optimizer.step()
    stored = der.buffer["logits"][:32]
    assert torch.allclose(stored, at_insertion, atol=1e-6)
    with torch.no_grad():
        assert (der.model(x) - stored).abs().max() > 0.1  # the model has moved on


@pytest.mark.parametrize("name", ["der", "der++"])
def test_der_loss_is_the_papers_on_the_same_buffer_batches(fmnist_root, name):
    """loss = CE(x) + alpha * mean((h(x') - z')^2) [+ beta * CE(x'', y'')], x' and x'' drawn independently."""
    stream = make_stream("split-fashion-mnist", root=fmnist_root)
    der = _set_up(name, stream, alpha=0.7, beta=0.3, replay_batch_size=16) if name == "der++" else \
        _set_up(name, stream, alpha=0.7, replay_batch_size=16)
    der.training_loss(*_batch(stream[0], 64), stream[0])
    x, y = _batch(stream[1], 32)
    model = copy.deepcopy(der.model)
    torch.manual_seed(3)
    loss = der.training_loss(x, y, stream[1])
    torch.manual_seed(3)
    first = torch.randperm(64)[:16]
    expected = F.cross_entropy(model(x), y) + 0.7 * F.mse_loss(model(der.buffer["x"][first]), der.buffer["logits"][first])
    if name == "der++":
        second = torch.randperm(64)[:16]
        assert not torch.equal(first, second)
        expected = expected + 0.3 * F.cross_entropy(model(der.buffer["x"][second]), der.buffer["y"][second])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


# --- ER-ACE -------------------------------------------------------------------------------------------
def test_er_ace_incoming_loss_ignores_the_logits_of_old_absent_classes(fmnist_root):
    stream = make_stream("split-fashion-mnist", root=fmnist_root)
    ace = _set_up("er-ace", stream, buffer_size=100)
    ace.training_loss(*_batch(stream[0]), stream[0])  # classes 0 and 1 are now seen
    ace.training_loss(*_batch(stream[1]), stream[1])  # and 2, 3
    ace.buffer = ReservoirBuffer(100)  # only the incoming term from here on
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    ace.model.register_forward_hook(keep)
    x, y = _batch(stream[2])  # classes 4, 5
    loss = ace.training_loss(x, y, stream[2])
    loss.backward()
    grad = captured["logits"].grad
    assert torch.equal(grad[:, :4], torch.zeros_like(grad[:, :4]))  # seen before, absent now: masked
    assert (grad[:, 4:].abs().sum(0) > 0).all()  # the batch's classes and the unseen ones 6..9 compete
    logits = captured["logits"].detach()
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits[:, 4:], y - 4)), rel=1e-6)


def test_er_ace_replays_over_all_classes(fmnist_root):
    stream = make_stream("split-fashion-mnist", root=fmnist_root)
    ace = _set_up("er-ace", stream, buffer_size=200, replay_batch_size=20)  # never full: slots 0..63 stay
    ace.training_loss(*_batch(stream[0]), stream[0])
    x, y = _batch(stream[1])
    model = copy.deepcopy(ace.model)
    torch.manual_seed(5)
    loss = ace.training_loss(x, y, stream[1])
    torch.manual_seed(5)
    pick = torch.randperm(64)[:20]
    masked = model(x)
    masked[:, :2] = torch.finfo(masked.dtype).min  # classes 0, 1 seen and absent
    expected = F.cross_entropy(masked, y) + F.cross_entropy(model(ace.buffer["x"][pick]), ace.buffer["y"][pick])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


# --- every memory method: runs, scenarios, refusals, determinism -------------------------------------
@pytest.mark.parametrize("name", MEMORY)
def test_memory_methods_are_bit_reproducible_with_two_threads(fmnist_root, name):
    """A small buffer makes samples of one batch draw the same slot often."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = {"memory_per_task": 16} if name == "a-gem" else {"buffer_size": 16}
        runs = [run(make_stream("permuted-fashion-mnist", tasks=3, root=fmnist_root), make_strategy(name, epochs=1, batch_size=100, **args),
                    device="cpu", seed=3, progress=False, model_args={"widths": (32,)}) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert runs[0].R == runs[1].R and runs[0].loss_curves == runs[1].loss_curves
    assert runs[0].extra["memory_samples"] > 0


@pytest.mark.parametrize("scenario", ["class", "task"])
@pytest.mark.parametrize("name", MEMORY)
def test_memory_methods_run_in_every_scenario_through_the_api(fmnist_root, name, scenario):
    stream = make_stream("split-fashion-mnist", scenario=scenario, root=fmnist_root)
    result = run(stream, make_strategy(name, epochs=3, batch_size=32), device="cpu", progress=False,
                 model_args={"widths": (32,)})
    assert result.complete and result.extra["memory_samples"] > 0
    # a learner that keeps only the last task scores 1/5 class-incrementally; the fake classes are easy to keep
    assert result.metrics["acc"] > (0.3 if scenario == "class" else 0.9)


@pytest.mark.parametrize("name", ["a-gem", "der", "der++"])
def test_memory_methods_on_the_regression_stream(name):
    stream = make_stream("teacher-student", tasks=2, input_dim=200)
    result = run(stream, make_strategy(name), device="cpu", progress=False)
    assert result.complete and result.extra["memory_samples"] > 0
    assert result.metrics["acc"] > 0.5  # both tasks learned: 0 at W = 0, about 0.7 for plain training


@pytest.mark.parametrize("args, message", [
    ({"name": "er-ace"}, "needs a classification stream"),
    ({"name": "a-gem", "memory_per_task": 10, "buffer_size": 100}, "not both"),
    ({"name": "a-gem", "buffer_size": 1}, "buffer_size >= 2"),
    ({"name": "a-gem", "replay_batch_size": 0}, "replay_batch_size must be a positive whole number"),
    ({"name": "der", "alpha": -1}, "alpha must be a finite number >= 0"),
    ({"name": "der++", "beta": float("nan")}, "beta must be a finite number >= 0"),
    ({"name": "er-ace", "buffer_size": 2.5}, "buffer_size must be a positive whole number"),
])
def test_memory_methods_refuse_bad_input(args, message):
    stream = make_stream("teacher-student", tasks=2, input_dim=50)
    with pytest.raises(ClbenchError, match=message):
        run(stream, make_strategy(args.pop("name"), **args), device="cpu", progress=False)


@pytest.mark.parametrize("name", MEMORY)
def test_memory_methods_run_from_the_cli(cli, fmnist_root, tmp_path, name):
    import json

    out = tmp_path / "r.json"
    code, stdout, stderr = cli("run", "--stream", "split-fashion-mnist", "--stream-arg", f"root={fmnist_root}",
                               "--strategy", name, "--strategy-arg", "epochs=1", "--model-arg", "widths=[32]",
                               "--output", str(out), "--quiet", "--device", "cpu")
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert data["config"]["strategy"] == name and data["extra"]["memory_samples"] > 0


# --- real Fashion-MNIST -------------------------------------------------------------------------------
@pytest.mark.slow
def test_memory_methods_beat_finetune_on_real_split_fashion_mnist(real_fashion_mnist):
    """Class-incremental split Fashion-MNIST, 5 x 2 classes, MLP 2 x 400, 2 epochs a task, 500 samples of memory."""
    stream = make_stream("split-fashion-mnist", root=str(real_fashion_mnist))
    acc = {name: run(stream, make_strategy(name, epochs=2, **({} if name == "finetune" else {"buffer_size": 500})),
                     device="cpu", seed=0, progress=False).metrics["acc"] for name in ["finetune", *MEMORY]}
    assert acc["finetune"] < 0.25  # forgets all but the last task
    for name in MEMORY:
        assert acc[name] > acc["finetune"] + 0.15, acc
