"""MAS, iCaRL, BiC and GDumb: each against a slow obvious reference, plus determinism, CLI and refusals."""
import json

import pytest
import torch
from fake_data import write_idx_dataset
from torch import nn

from clbench import make_strategy, make_stream, run
from clbench.core.class_buffer import ClassBalancedBuffer, herding
from clbench.core.errors import ClbenchError
from clbench.models.networks import build_model

SMALL = {"widths": (32,)}


@pytest.fixture
def mnist_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    return str(write_idx_dataset(tmp_path / "mnist", train=600, test=200))


def split(root, scenario="class"):
    return make_stream("split-mnist", scenario=scenario, root=root)


# --- MAS ----------------------------------------------------------------------------------------------
def slow_mas_importance(model, x):
    """(1/N) sum_n |d ||f(x_n)||^2 / d theta|, one autograd call per sample."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for n in range(len(x)):
        grads = torch.autograd.grad(model(x[n:n + 1]).pow(2).sum(), list(model.parameters()))
        for t, g in zip(total, grads):
            t += g.abs()
    return torch.cat([t.reshape(-1) for t in total]) / len(x)


class Normed(nn.Module):
    """A net with a LayerNorm (not a Linear-only model), so MAS takes its per-sample torch.func route."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 10))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("model_kind", ["mlp", "layernorm"])
def test_mas_importance_is_the_mean_per_sample_gradient_magnitude_of_the_squared_output_norm(mnist_root,
                                                                                             model_kind):
    from clbench.strategies.mas import mas_importance

    stream = split(mnist_root)
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, widths=(16, 8)) if model_kind == "mlp" else Normed()
    mas = make_strategy("mas")
    mas.setup(model, stream)
    task = stream[1]
    got = mas_importance(mas, task, samples=70, batch_size=32)
    expected = slow_mas_importance(model, task.inputs(task.train_x[:70]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


def test_mas_accumulates_importance_and_anchors_at_the_latest_weights(mnist_root):
    """Paper's form: Omega = Omega_1 + Omega_2, theta* = weights after task 2, penalty lambda sum Omega d^2."""
    from clbench.core.strategy import parameter_vector
    from clbench.strategies.mas import mas_importance

    stream = split(mnist_root)
    torch.manual_seed(0)
    mas = make_strategy("mas", strength=0.3, samples=50)
    mas.setup(build_model("mlp", (1, 28, 28), 10, widths=(16,)), stream)
    omegas = []
    for task in stream.tasks[:2]:
        with torch.no_grad():
            for p in mas.model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # "training" moves the weights
        omegas.append(mas_importance(mas, task, 50))
        mas.after_task(task)
    anchor = parameter_vector(mas.model)
    with torch.no_grad():
        for p in mas.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = parameter_vector(mas.model) - anchor
    expected = 0.3 * ((omegas[0] + omegas[1]) * d * d).sum()
    assert float(mas.penalty().detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    per_task = make_strategy("mas", form="per-task")
    assert per_task.form == "per-task"


@pytest.mark.parametrize("form", ["accumulated", "per-task"])
def test_mas_batched_form_gives_the_engines_R(form):
    import numpy as np

    from clbench.batched import Member, run_batched

    kw = {"model_name": "mlp", "model_args": {"widths": (12,)}}
    streams = [make_stream("teacher-student", input_dim=40, latent_dim=6, output_dim=3, mode="sampled", samples=96,
                           tasks=3, seed=seed) for seed in range(2)]
    args = {"strength": 3.0, "form": form, "epochs": 2, "batch_size": 32}
    batched = run_batched([Member(s, make_strategy("mas", **args), seed) for seed, s in enumerate(streams)],
                          device="cpu", **kw)
    for seed, (stream, got) in enumerate(zip(streams, batched)):
        want = run(stream, make_strategy("mas", **args), device="cpu", seed=seed, progress=False, **kw)
        np.testing.assert_allclose(got.R, want.R, atol=1e-5)
        np.testing.assert_allclose(got.loss_curves, want.loss_curves, rtol=1e-4, atol=1e-6)


# --- iCaRL --------------------------------------------------------------------------------------------
def slow_herding(features, m):
    mu = features.mean(0)
    chosen = []
    for k in range(1, m + 1):
        best, best_distance = None, float("inf")
        for i in range(len(features)):
            if i in chosen:
                continue
            mean = (sum((features[j] for j in chosen), torch.zeros_like(mu)) + features[i]) / k
            distance = float(((mu - mean) ** 2).sum())
            if distance < best_distance:
                best, best_distance = i, distance
        chosen.append(best)
    return chosen


def test_herding_greedily_picks_the_exemplar_whose_running_mean_is_closest_to_the_class_mean():
    torch.manual_seed(1)
    features = torch.nn.functional.normalize(torch.randn(40, 8, dtype=torch.float64) + 0.5, dim=1)
    assert herding(features, 15).tolist() == slow_herding(features, 15)
    assert sorted(herding(features, 100).tolist()) == list(range(40))  # m > n: every sample, once


def test_icarl_classifies_by_the_nearest_mean_of_exemplars(mnist_root):
    stream = split(mnist_root)
    torch.manual_seed(0)
    icarl = make_strategy("icarl", memory_size=30)
    icarl.setup(build_model("mlp", (1, 28, 28), 10, **SMALL), stream)
    for task in stream.tasks[:2]:
        icarl.before_task(task)
        icarl.after_task(task)
    assert icarl.memory.counts() == {0: 7, 1: 7, 2: 7, 3: 7}  # K = 30 over 4 classes: 7 each
    model = icarl.model
    x = torch.cat([stream[k].inputs(stream[k].test_x) for k in range(3)])

    def phi(inputs):
        return torch.nn.functional.normalize(model[:-1](inputs), dim=1)  # the MLP's last hidden layer

    means = {}
    mx, my, _ = icarl.memory.data()
    for c in range(4):
        means[c] = torch.nn.functional.normalize(phi(mx[my == c]).mean(0), dim=0)
    expected = [min(means, key=lambda c: float(((f - means[c]) ** 2).sum())) for f in phi(x)]
    with torch.no_grad():
        got = icarl.predict(x, stream[0]).argmax(1).tolist()
    assert got == expected


def test_icarl_loss_is_sigmoid_bce_with_the_old_models_outputs_as_old_class_targets(mnist_root):
    stream = split(mnist_root)
    torch.manual_seed(0)
    icarl = make_strategy("icarl", memory_size=20)
    icarl.setup(build_model("mlp", (1, 28, 28), 10, **SMALL), stream)
    icarl.before_task(stream[0])
    icarl.after_task(stream[0])
    icarl.before_task(stream[1])
    with torch.no_grad():
        for p in icarl.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = stream[1].inputs(stream[1].train_x[:16]), stream[1].train_y[:16]
    old, new = torch.sigmoid(icarl.old(x)), icarl.model(x)
    target = torch.stack([old[:, 0], old[:, 1], (y == 2).float(), (y == 3).float()], 1)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(new[:, :4], target)
    assert float(icarl.training_loss(x, y, stream[1]).detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


# --- BiC ----------------------------------------------------------------------------------------------
def test_bic_correction_leaves_old_logits_and_maps_new_ones_to_alpha_z_plus_beta():
    from clbench.strategies.bic import correct

    z = torch.randn(6, 10)
    new = torch.tensor([4, 5])
    out = correct(z, (new, 0.7, -1.3))
    old = torch.tensor([0, 1, 2, 3, 6, 7, 8, 9])
    assert torch.equal(out[:, old], z[:, old])
    torch.testing.assert_close(out[:, new], 0.7 * z[:, new] - 1.3)
    assert torch.equal(correct(z, None), z)


def test_bic_fit_is_the_minimiser_of_the_validation_cross_entropy_with_its_ridge():
    """Against a grid search; biased logits (new classes favoured) need alpha < 1 or beta < 0."""
    from clbench.strategies.bic import correct, fit_bias

    torch.manual_seed(0)
    y = torch.randint(0, 4, (80,))
    z = torch.randn(80, 6) + 2.5 * torch.nn.functional.one_hot(y, 6)
    z[:, 2:4] += 1.5  # the new classes' bias
    columns, new = torch.arange(4), torch.tensor([2, 3])

    def objective(a, b):
        ce = torch.nn.functional.cross_entropy(correct(z.double(), (new, a, b))[:, :4], y)
        return float(ce) + 1e-3 * ((a - 1) ** 2 + b ** 2)

    alpha, beta = fit_bias(z, y, columns, new, ridge=1e-3)
    grid = min(objective(a / 20, b / 20) for a in range(0, 61) for b in range(-60, 61))
    assert objective(alpha, beta) <= grid + 1e-9
    assert beta < -0.5 and objective(alpha, beta) < objective(1.0, 0.0) - 0.05
    separable = fit_bias(10 * torch.nn.functional.one_hot(y, 6).float(), y, columns, new, ridge=1e-3)
    assert all(abs(v) < 1e3 for v in separable)


def test_bic_holds_out_a_balanced_validation_share_and_fits_the_new_classes_bias(mnist_root):
    stream = split(mnist_root)
    result = run(stream, make_strategy("bic", memory_size=40, epochs=1, lr=0.05), device="cpu",
                 seed=0, progress=False, model_args=SMALL)
    bic = result.extra
    assert bic["memory_samples"] == 40 and len(bic["bias_correction"]) == 4  # one fit per task after the first
    assert all(a != 1.0 or b != 0.0 for a, b in bic["bias_correction"])
    strategy = make_strategy("bic", memory_size=40, val_share=0.25)
    strategy.setup(build_model("mlp", (1, 28, 28), 10, **SMALL), stream)
    strategy.before_task(stream[0])
    strategy.after_task(stream[0])
    strategy.before_task(stream[1])
    _, val_y = strategy.val  # 25% of the 20 exemplars per old class, as many of each new class
    assert {c: int((val_y == c).sum()) for c in range(4)} == {0: 5, 1: 5, 2: 5, 3: 5}
    assert len(strategy.train_set.train_x) == len(stream[1].train_x) - 10 + 30


def test_bic_loss_weighs_distillation_by_the_share_of_old_classes(mnist_root):
    """lambda L_d + (1 - lambda) L_c with lambda = n / (n + m), L_d the soft cross-entropy at T over old classes
    (targets from the old model with its correction), L_c the cross-entropy over all classes seen."""
    from clbench.strategies.bic import correct

    stream = split(mnist_root)
    torch.manual_seed(0)
    bic = make_strategy("bic", memory_size=40, temperature=3.0)
    bic.setup(build_model("mlp", (1, 28, 28), 10, **SMALL), stream)
    for task in stream.tasks[:2]:
        bic.before_task(task)
        bic.after_task(task)
    bic.old_bias = (torch.tensor([2, 3]), 1.5, -0.5)  # as if fitted after task 2
    bic.before_task(stream[2])
    with torch.no_grad():
        for p in bic.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = stream[2].inputs(stream[2].train_x[:16]), stream[2].train_y[:16]
    old = correct(bic.old(x), bic.old_bias)[:, :4]
    new = bic.model(x)
    soft = -(torch.softmax(old / 3, 1) * torch.log_softmax(new[:, :4] / 3, 1)).sum(1).mean()
    hard = torch.nn.functional.cross_entropy(new[:, :6], y)
    expected = 4 / 6 * soft + 2 / 6 * hard
    assert float(bic.training_loss(x, y, stream[2]).detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


# --- GDumb --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_gdumb_memory_stays_class_balanced_after_every_insertion(seed):
    """Whatever the order and class frequencies: the memory holds min(K, seen) samples, each slot the sample
    its bookkeeping says, and every class that lost samples is within one of the largest; so once every class
    has lost some, max - min <= 1."""
    g = torch.Generator().manual_seed(seed)
    capacity = int(torch.randint(5, 30, (1,), generator=g))
    weights = torch.rand(6, generator=g) + 0.05
    labels = torch.multinomial(weights, 300, replacement=True, generator=g)
    if seed % 2:
        labels = labels.sort().values  # a stream sorted by class: classes arrive one after the other
    torch.manual_seed(seed)
    memory = ClassBalancedBuffer(capacity)
    seen = torch.zeros(6, dtype=torch.long)
    position = 0
    while position < len(labels):
        n = int(torch.randint(1, 9, (1,), generator=g))  # batches of 1-8 samples
        y = labels[position:position + n]
        memory.add_greedy(torch.arange(position, position + len(y)).float()[:, None], y, task_id=0)
        position += len(y)
        seen += torch.bincount(y, minlength=6)
        counts = memory.counts()
        assert len(memory) == min(capacity, position) == sum(counts.values())
        x, stored_y, _ = memory.data()
        assert torch.equal(labels[x[:, 0].long()], stored_y)  # the samples written are the ones booked
        assert len(x[:, 0].unique()) == len(x)
        largest = max(counts.values())
        capped = [c for c in range(6) if counts.get(c, 0) < seen[c]]
        assert all(counts.get(c, 0) >= largest - 1 for c in capped)
        if len(capped) == int((seen > 0).sum()):
            assert largest - min(counts.values()) <= 1


def test_gdumb_refits_from_scratch_on_the_memory_alone(mnist_root):
    stream = split(mnist_root)
    gdumb = make_strategy("gdumb", memory_size=40, fit_epochs=4)
    result = run(stream, gdumb, device="cpu", seed=0, progress=False, model_args=SMALL)
    assert result.config["epochs"] == 0  # the stream's learner is not trained
    assert result.extra["memory_samples"] == 40 and set(result.extra["memory_per_class"].values()) == {4}
    torch.manual_seed(0)  # what run() does before building the model: the refit starts from these weights
    initial = build_model("mlp", (1, 28, 28), 10, **SMALL).state_dict()
    assert all(torch.equal(gdumb.initial[k], v) for k, v in initial.items())
    # after task 1 only classes 0 and 1 are in memory: the others are masked at test
    assert result.R[1][2] == 0.0 and result.R[1][0] > 0.5


def test_gdumb_learning_rate_schedule_is_warmup_then_cosine_with_doubling_restarts():
    from clbench.strategies.gdumb import sgdr_rate

    rates = [sgdr_rate(e, 0.05, 0.0005) for e in range(8)]
    assert rates[0] == pytest.approx(0.005)
    # restarts at epochs 1, 2, 4, 8, ... (periods 1, 2, 4, ...)
    assert rates[1] == pytest.approx(0.05) and rates[2] == pytest.approx(0.05) and rates[4] == pytest.approx(0.05)
    assert rates[3] == pytest.approx(0.0005 + 0.0495 * 0.5)
    assert rates[5] == pytest.approx(0.0005 + 0.0495 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()) / 2)


# --- all four -----------------------------------------------------------------------------------------
ARGS = {"mas": {"strength": 1.0, "samples": 100}, "icarl": {"memory_size": 40}, "bic": {"memory_size": 40},
        "gdumb": {"memory_size": 40, "fit_epochs": 2}}


@pytest.mark.parametrize("name", list(ARGS))
def test_same_seed_and_two_threads_give_the_same_R_bit_for_bit(mnist_root, name):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = [run(split(mnist_root), make_strategy(name, epochs=1, lr=0.05, **ARGS[name]), device="cpu", seed=4,
                       progress=False, model_args=SMALL) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert results[0].R == results[1].R
    assert results[0].extra["memory_samples"] == ARGS[name].get("memory_size", 0)


@pytest.mark.parametrize("name", list(ARGS))
def test_each_runs_from_the_cli(cli, tmp_path, mnist_root, name):
    out = tmp_path / "r.json"
    args = [a for key, value in ARGS[name].items() for a in ("--strategy-arg", f"{key}={value}")]
    code, _, stderr = cli("run", "--stream", "split-mnist", "--stream-arg", f"root={mnist_root}", "--strategy", name,
                          *args, "--strategy-arg", "epochs=1", "--model-arg", "widths=32", "--output", str(out),
                          "--quiet", "--device", "cpu")
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert data["config"]["strategy"] == name and len(data["R"]) == 6
    assert data["extra"]["memory_samples"] == ARGS[name].get("memory_size", 0)


def test_icarl_and_gdumb_run_task_incremental_and_refusals_are_clear(mnist_root):
    for name, args in (("icarl", {"memory_size": 40}), ("gdumb", {"memory_size": 40, "fit_epochs": 8})):
        result = run(split(mnist_root, "task"), make_strategy(name, epochs=1, lr=0.05, **args), device="cpu",
                     seed=0, progress=False, model_args=SMALL)
        assert result.metrics["acc"] > 0.6
    with pytest.raises(ClbenchError, match="supports the class-incremental"):
        run(split(mnist_root, "task"), make_strategy("bic"), device="cpu", progress=False)
    with pytest.raises(ClbenchError, match="icarl.*domain-incremental|class/task-incremental"):
        run(make_stream("permuted-mnist", tasks=2, root=mnist_root), make_strategy("icarl"), device="cpu",
            progress=False)
    with pytest.raises(ClbenchError, match="regression"):
        run(make_stream("teacher-student", input_dim=20, latent_dim=4, output_dim=2), make_strategy("gdumb"),
            device="cpu", progress=False)
    with pytest.raises(ClbenchError, match="memory_size must be a positive whole number"):
        make_strategy("icarl", memory_size=0)
    with pytest.raises(ClbenchError, match="smaller than the 4 classes"):
        run(split(mnist_root), make_strategy("icarl", memory_size=3, epochs=1), device="cpu", progress=False,
            model_args=SMALL)
    with pytest.raises(ClbenchError, match="form must be accumulated"):
        make_strategy("mas", form="online")
    with pytest.raises(ClbenchError, match="fisher_samples belong to EWC"):
        make_strategy("mas", fisher_samples=10)
    with pytest.raises(ClbenchError, match="val_share"):
        make_strategy("bic", val_share=1.5)


# --- real data ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_memory_methods_beat_finetune_on_real_split_fashion_mnist(real_fashion_mnist, capsys):
    """Class-incremental split Fashion-MNIST 5 x 2 (the suite's 12000 training and 2000 test images), MLP 2 x 400,
    2 epochs, memory 500; GDumb refits for 16 epochs (its default is 128) to keep the test short."""
    stream = lambda: make_stream("split-fashion-mnist", scenario="class", root=str(real_fashion_mnist),  # noqa: E731
                                 train_samples=12000, test_samples=2000)
    common = {"epochs": 2, "lr": 0.05}
    acc = {name: run(stream(), make_strategy(name, **common, **args), device="cpu", seed=0, progress=False).metrics["acc"]
           for name, args in [("finetune", {}), ("icarl", {"memory_size": 500}), ("bic", {"memory_size": 500}),
                              ("gdumb", {"memory_size": 500, "fit_epochs": 16})]}
    with capsys.disabled():
        print("\nsplit Fashion-MNIST, class-incremental, ACC:", {k: round(v, 4) for k, v in acc.items()})
    for name in ("icarl", "bic", "gdumb"):
        assert acc[name] > acc["finetune"] + 0.2, acc  # finetune keeps only the last task: about 0.2
