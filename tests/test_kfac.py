"""K-FAC (Kronecker-factored) Fisher against the exact full Fisher, and K-FAC EWC on deep nets."""
import numpy as np
import pytest
import torch

from clbench import make_strategy, make_stream, run
from clbench.core.types import Stream, Task, TrainDefaults
from clbench.fisher import estimators as fisher


def regression_stream(n=4000, d=12, out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.3, 2.0, d)  # anisotropic inputs
    y = torch.randn(n, out, generator=g)
    task = Task(0, x, y, x[:100], y[:100])
    return Stream("toy", [task], "domain", "mse", (d,), out, TrainDefaults(model="linear", epochs=0))


def test_kfac_equals_exact_fisher_for_one_linear_layer_with_gaussian_outputs():
    """One Linear layer, Gaussian likelihood: F = E[x x^T] (x) I exactly, and K-FAC's G -> I by sampling."""
    torch.manual_seed(0)
    stream = regression_stream()
    strategy = make_strategy("ewc-full")
    model = torch.nn.Sequential(torch.nn.Linear(12, 3, bias=True))
    strategy.setup(model, stream)
    task = stream[0]
    form, rows = fisher.full(strategy, task, samples=4000)
    exact = rows.T @ rows if form == "rows" else rows
    (module, A, G), = fisher.kfac(strategy, task, samples=4000)
    torch.testing.assert_close(G, torch.eye(3), atol=0.08, rtol=0)  # sampling error of E[eps eps^T]
    for trial in range(5):
        dW, db = torch.randn(3, 12), torch.randn(3)
        # parameter order in the flat vector: weight (row-major), then bias
        d = torch.cat([dW.reshape(-1), db])
        q_exact = float(d @ exact @ d)
        q_kfac = float(fisher.kfac_quadratic(module, A, G, dW, db))
        assert q_kfac == pytest.approx(q_exact, rel=0.06), trial
        q_kfac_identity = float(fisher.kfac_quadratic(module, A, torch.eye(3), dW, db))
        assert q_kfac_identity == pytest.approx(q_exact, rel=1e-4)  # with G = I the two are the same form


def test_kfac_classification_matches_the_exact_block_structure_for_a_single_layer():
    """Softmax regression: the exact Fisher is E[(diag p - p p^T) (x) x x^T]; K-FAC approximates it, and
    the true-Fisher sampling estimate of E[g g^T] matches E[diag p - p p^T]."""
    torch.manual_seed(0)
    n, d, c = 3000, 6, 4
    x = torch.randn(n, d)
    task = Task(0, x, torch.randint(0, c, (n,)), x[:10], torch.zeros(10, dtype=torch.long))
    stream = Stream("toy", [task], "class", "ce", (d,), c, TrainDefaults(model="linear", epochs=0))
    strategy = make_strategy("ewc-full")
    model = torch.nn.Sequential(torch.nn.Linear(d, c, bias=False))
    torch.nn.init.normal_(model[0].weight, std=0.5)
    strategy.setup(model, stream)
    (_, A, G), = fisher.kfac(strategy, task, samples=n)
    p = torch.softmax(model(x), 1).detach()
    expected_G = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).mean(0)
    torch.testing.assert_close(G, expected_G, atol=0.02, rtol=0)
    torch.testing.assert_close(A, x.T @ x / n)


def test_kfac_ewc_protects_an_mlp_better_than_finetune_on_teacher_student():
    kw = dict(rho_a=0.5, rho_b=0.0, input_dim=100, latent_dim=10, output_dim=5, mode="sampled", samples=2000)
    model = {"model_name": "mlp", "model_args": {"widths": (64,)}}
    fine = run(make_stream("teacher-student", **kw), make_strategy("finetune", lr=0.01, epochs=30), device="cpu",
               progress=False, **model)
    ewc = run(make_stream("teacher-student", **kw),
              make_strategy("ewc-full", fisher_form="kfac", strength=5.0, lr=0.01, epochs=30, fisher_samples=2000),
              device="cpu", progress=False, **model)
    diag = run(make_stream("teacher-student", **kw),
               make_strategy("ewc-diag", strength=5.0, lr=0.01, epochs=30, fisher_samples=2000), device="cpu",
               progress=False, **model)
    assert ewc.extra["fisher_form"] == "kfac" and ewc.extra["fisher"] == "true"
    # Hiratani 2024: the (layer-wise) full Fisher keeps retention; the diagonal is much weaker
    assert ewc.metrics["retention"] > 0.9
    assert ewc.metrics["retention"] > diag.metrics["retention"] + 0.1 > fine.metrics["retention"] + 0.1


def test_kfac_handles_conv_layers_and_accumulates_tasks():
    torch.manual_seed(0)
    n = 64
    x = torch.randint(0, 255, (n, 1, 8, 8), dtype=torch.uint8)
    tasks = [Task(t, x, torch.randint(0, 3, (n,)), x[:8], torch.zeros(8, dtype=torch.long)) for t in range(3)]
    stream = Stream("toy", tasks, "domain", "ce", (1, 8, 8), 3,
                    TrainDefaults(model="mlp", epochs=1, batch_size=16, lr=0.01))
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 64, 3))
    strategy = make_strategy("ewc-full", fisher_form="kfac", form="online", decay=0.5)
    result = run(stream, strategy, model=model, device="cpu", progress=False)
    assert np.isfinite(np.array(result.R)).all()
    [((form, terms), _)] = strategy.penalties
    assert form == "kfac" and len(terms) == 2 * 3  # two layers, three tasks
    assert sorted({w for *_, w in terms}) == [0.25, 0.5, 1.0]
    conv_A = terms[0][1]
    for term in terms:  # kfac_quadratic's one-product gradient relies on exactly symmetric factors
        assert torch.equal(term[1], term[1].T) and torch.equal(term[2], term[2].T)
    assert conv_A.shape == (1 * 9 + 1, 1 * 9 + 1)
    assert float(strategy.penalty().detach()) == pytest.approx(0.0, abs=1e-6)  # at the anchor


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_fast_linear_diagonal_equals_the_per_sample_jacobian_path(loss, kind):
    torch.manual_seed(0)
    n, d, c = 60, 20, 5
    x = torch.randn(n, d)
    y = torch.randint(0, c, (n,)) if loss == "ce" else torch.randn(n, c)
    task = Task(0, x, y, x[:5], y[:5])
    stream = Stream("toy", [task], "domain", loss, (d,), c, TrainDefaults(model="mlp", epochs=0))
    strategy = make_strategy("ewc-diag")
    strategy.setup(torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, c)), stream)
    fast = fisher.diagonal(strategy, task, n, kind)
    reference = sum((rows**2).sum(0) for rows in fisher.fisher_rows(strategy, task, n, kind)) / n
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-7)


def test_kfac_quadratic_gradient_equals_autograd_of_the_plain_form():
    torch.manual_seed(0)
    module = torch.nn.Linear(5, 3)
    X, Y = torch.randn(40, 6), torch.randn(30, 3)
    A, G = X.T @ X / 40, Y.T @ Y / 30  # float32: not bit-symmetric with every BLAS; kfac_quadratic must not care
    A[0, 1] += 1e-7  # make sure of it
    dW = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    db = torch.randn(3, dtype=torch.float64, requires_grad=True)
    q = fisher.kfac_quadratic(module, A.double(), G.double(), dW, db)
    q.backward()
    plain_w, plain_b = dW.detach().clone().requires_grad_(), db.detach().clone().requires_grad_()
    D = torch.cat([plain_w, plain_b[:, None]], 1)
    reference = torch.trace(fisher.symmetric_part(G.double()) @ D @ fisher.symmetric_part(A.double()) @ D.T)
    reference.backward()
    assert q.item() == pytest.approx(reference.item(), rel=1e-10)
    assert torch.allclose(dW.grad, plain_w.grad, rtol=1e-10) and torch.allclose(db.grad, plain_b.grad, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda w, b: fisher.kfac_quadratic(module, A.double(), G.double(), w, b),
                                    (dW.detach().requires_grad_(), db.detach().requires_grad_()))
