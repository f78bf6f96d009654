"""Vectorised seeds give the engine's matrices."""
import numpy as np
import pytest

from clbench import ClbenchError, make_strategy, make_stream, run
from clbench.batched import run_seeds
from fake_data import write_idx_dataset


def test_vectorised_seeds_match_separate_runs_regression():
    stream = make_stream("teacher-student", tasks=3, input_dim=100, latent_dim=10, output_dim=4, mode="sampled",
                         samples=500)
    kw = dict(model_name="mlp", model_args={"widths": (32,)})
    batched = run_seeds(stream, [0, 1, 2], epochs=3, lr=0.002, device="cpu", **kw)
    for b in batched:
        single = run(stream, make_strategy("finetune", epochs=3, lr=0.002), device="cpu", seed=b["seed"],
                     progress=False, **kw)
        np.testing.assert_allclose(b["R"], single.R, atol=1e-4)
    assert not np.allclose(batched[0]["R"], batched[1]["R"])  # the seeds really differ


def test_vectorised_seeds_match_separate_runs_classification(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    stream = make_stream("permuted-mnist", tasks=2, rho_a=0.5, root=str(write_idx_dataset(tmp_path / "m")))
    batched = run_seeds(stream, [3, 4], epochs=2, device="cpu", model_args={"widths": (64,)})
    for b in batched:
        single = run(stream, make_strategy("finetune", epochs=2), device="cpu", seed=b["seed"], progress=False,
                     model_args={"widths": (64,)})
        np.testing.assert_allclose(b["R"], single.R, atol=0.01)  # accuracy: at most a couple of test samples flip
        assert b["metrics"]["acc"] == pytest.approx(single.metrics["acc"], abs=0.01)


def test_models_with_buffers_are_refused():
    stream = make_stream("teacher-student", input_dim=50, latent_dim=5, output_dim=2)
    stream.input_shape = (2, 5, 5)
    with pytest.raises(ClbenchError, match="without buffers"):
        run_seeds(stream, [0], model_name="resnet18-reduced", device="cpu")
