"""L2P (Wang et al. 2022) and `clbench pretrain`: frozen backbone, masked training, per-sample prompts, histograms."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clbench
from clbench.core.types import Stream, Task, TrainDefaults
from clbench.models.pretrain import checkpoint_metadata, pretrain, synthetic_digits
from clbench.strategies.l2p import L2P

ROOT = Path(__file__).resolve().parents[1]


class Scale:
    def __call__(self, x):
        return x.float() / 255


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "vit.pth"
    pretrain(path, "synthetic-digits", samples=1500, epochs=4, batch_size=32, lr=5e-3, patch_size=4, embed_dim=32,
             depth=2, num_heads=2, log=lambda *_: None)  # ~1.5 s, weak features: these tests check L2P's mechanics
    return path


def digit_stream(T=3, n=100):
    """Class-incremental: task t holds synthetic digits 2t and 2t+1 (a different draw from the pretraining one)."""
    x, y = synthetic_digits(4000, seed=123)
    tasks = []
    for t in range(T):
        idx = torch.nonzero(torch.isin(y, torch.tensor([2 * t, 2 * t + 1]))).flatten()
        tr, te = idx[:n], idx[n:2 * n]
        tasks.append(Task(t, x[tr], y[tr], x[te], y[te], Scale(), classes=[2 * t, 2 * t + 1]))
    return Stream("digits-ci", tasks, "class", "ce", (1, 28, 28), 2 * T,
                  TrainDefaults(model="linear", epochs=3, batch_size=32, lr=0.01, optimizer="adam"))


class Recording(L2P):
    """L2P that keeps a copy of the head weights at setup and after each task."""

    def setup(self, model, stream):
        model = super().setup(model, stream)
        self.heads = [model.head.weight.detach().clone()]
        return model

    def after_task(self, task):
        super().after_task(task)
        self.heads.append(self.model.head.weight.detach().clone())


def test_l2p_masks_frozen_backbone_histograms(checkpoint):
    stream = digit_stream()
    strategy = Recording(backbone_checkpoint=str(checkpoint), pool_size=6, prompt_length=2, top_n=2)
    result = clbench.run(stream, strategy, device="cpu", progress=False)
    # masked training: classes of later tasks get no gradient; the current task's classes do
    W0 = strategy.heads[0]
    for t in range(len(stream)):
        W = strategy.heads[t + 1]
        assert torch.equal(W[2 * t + 2:], W0[2 * t + 2:]), t
        assert not torch.equal(W[2 * t: 2 * t + 2], W0[2 * t: 2 * t + 2]), t
    # frozen backbone: weights equal the checkpoint's
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for k, v in strategy.model.backbone.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # histograms: N selections per sample, per task
    extra = result.extra
    assert extra["l2p_backbone"]["source"] == "checkpoint" and extra["l2p_backbone"]["pretraining"]["dataset"] == "synthetic-digits"
    for t, task in enumerate(stream):
        assert sum(extra["l2p_prompt_histogram_test"][str(t)]) == 2 * len(task.test_x)
        assert sum(extra["l2p_prompt_histogram_train"][str(t)]) == 2 * len(task.train_x) * 3
    # learns the first task and, unlike finetune (which predicts only the last task's classes), keeps it
    R = np.array(result.R)
    finetune = np.array(clbench.run(stream, clbench.make_strategy("finetune"), device="cpu", progress=False).R)
    assert R[1, 0] > 0.8, R
    assert R[-1, 0] > finetune[-1, 0] + 0.3, (R, finetune)


def test_l2p_selects_prompts_per_sample(checkpoint):
    """Test-time prompt choice depends on the sample only, not on the rest of the batch (no task leak)."""
    stream = digit_stream(T=2)
    strategy = clbench.make_strategy("l2p", backbone_checkpoint=str(checkpoint), pool_size=6, prompt_length=2,
                                     top_n=2, epochs=1)
    clbench.run(stream, strategy, device="cpu", progress=False)
    strategy.model.eval()
    x = torch.cat([stream[0].inputs(stream[0].test_x[:5]), stream[1].inputs(stream[1].test_x[:5])])
    with torch.no_grad():
        together = strategy.model(x)
        chosen = strategy.model.idx.clone()
        alone, alone_idx = [], []
        for i in range(len(x)):
            alone.append(strategy.model(x[i:i + 1]))
            alone_idx.append(strategy.model.idx)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)
    assert torch.equal(chosen, torch.cat(alone_idx))


def test_l2p_needs_a_backbone_and_class_scenario(checkpoint):
    with pytest.raises(clbench.ClbenchError, match="clbench pretrain"):
        clbench.run(digit_stream(T=1), clbench.make_strategy("l2p"), device="cpu", progress=False)
    with pytest.raises(clbench.ClbenchError, match="not found"):
        clbench.run(digit_stream(T=1), clbench.make_strategy("l2p", backbone_checkpoint="/nonexistent.pth"),
                    device="cpu", progress=False)
    stream = digit_stream(T=1)
    stream.scenario = "task"
    with pytest.raises(clbench.ClbenchError, match="class-incremental"):
        clbench.run(stream, clbench.make_strategy("l2p", backbone_checkpoint=str(checkpoint)), device="cpu",
                    progress=False)
    with pytest.raises(clbench.ClbenchError, match="top_n"):
        clbench.make_strategy("l2p", top_n=11)


def test_pretrain_cli_and_list(cli, tmp_path):
    out = tmp_path / "vit.pth"
    code, stdout, stderr = cli("pretrain", "--samples", "200", "--epochs", "1", "--embed-dim", "16", "--depth", "1",
                               "--heads", "2", "--patch-size", "7", "--classes", "0,1,2", "--output", str(out))
    assert code == 0, stderr
    meta = checkpoint_metadata(out)
    assert meta["dataset"] == "synthetic-digits" and meta["classes"] == [0, 1, 2]
    assert meta["backbone_args"]["embed_dim"] == 16 and "held-out accuracy" in stdout
    code, _, stderr = cli("pretrain", "--classes", "a,b", "--output", str(out))
    assert code == 2 and stderr.count("\n") == 1 and "--classes" in stderr
    code, stdout, _ = cli("list")
    assert code == 0 and "l2p" in stdout and "backbone_checkpoint=None" in stdout and "r2=1" in stdout


def test_l2p_through_the_cli(cli, tmp_path, checkpoint):
    """L2P runs through `clbench run` (the stream comes from a --plugin file)."""
    plugin = tmp_path / "digits_plugin.py"
    plugin.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import clbench\n"
        "from test_l2p import digit_stream\n"
        "clbench.register_stream('digits-ci')(lambda T=2: digit_stream(T))\n")
    out = tmp_path / "r.json"
    code, stdout, stderr = cli("--plugin", str(plugin), "run", "--stream", "digits-ci", "--strategy", "l2p",
                               "--strategy-arg", f"backbone_checkpoint={checkpoint}", "--strategy-arg", "epochs=1",
                               "--output", str(out), "--quiet")
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result["extra"]["l2p_backbone"]["file"] == str(checkpoint)
    assert set(result["extra"]["l2p_prompt_histogram_test"]) == {"0", "1"}
