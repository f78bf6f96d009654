"""Bad input: a clear one-line error (or an honest warning), nothing lost, no code run.

Every case of issue 9, section 3, reproduced through the real CLI (``clbench.cli.commands.main`` in this process,
which is what the ``clbench`` script runs, or the ``cli`` fixture's subprocess where a process boundary
matters) or through the Python API. No test depends on the machine's speed: where a test waits for
something, it polls with a generous bound.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import clbench
from clbench import ClbenchError
from clbench.data import datasets as data
from clbench.core import progress
from clbench.core import registry
from clbench.cli.commands import main
from clbench.core.errors import ClbenchWarning
from clbench.core.types import Stream, Task, TrainDefaults
from fake_data import write_cifar, write_idx_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--stream", "teacher-student", "--stream-arg", "input_dim=20", "--stream-arg", "latent_dim=4",
        "--strategy-arg", "epochs=5", "--device", "cpu", "--quiet"]


# ---- helpers ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def private_data(tmp_path, monkeypatch):
    """No test here sees the user's cache or the system's data sets unless it says so."""
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("CLBENCH_PLUGINS", raising=False)


@pytest.fixture
def clb(capsys):
    """The CLI in this process: (exit status, stdout, stderr)."""
    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def fresh_registry():
    """Plugins registered by a test are forgotten after it."""
    registry.names("strategy")  # built-ins loaded
    saved = {kind: dict(entries) for kind, entries in registry._REGISTRIES.items()}
    plugins, modules = list(registry.LOADED_PLUGINS), set(sys.modules)
    yield
    for kind, entries in saved.items():
        registry._REGISTRIES[kind].clear()
        registry._REGISTRIES[kind].update(entries)
    registry.LOADED_PLUGINS[:] = plugins
    for name in set(sys.modules) - modules:
        if name.startswith("clbench_plugin_"):
            del sys.modules[name]


def one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit 2 and exactly one line on stderr, ``clbench: error: ...`` holding every fragment; no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("clbench: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


MUST_NOT_TRAIN = '''
from clbench import Strategy, register_strategy

@register_strategy("test-must-not-train")
class MustNotTrain(Strategy):
    """Fails loudly if training ever starts."""
    def setup(self, model, stream):
        raise RuntimeError("TRAINING STARTED")
'''


def plugin(tmp_path: Path, source: str, name: str = "plugin.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def cli_without_root(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI in a subprocess that, even when the tests run as root, cannot write a read-only folder.

    Root writes anywhere, so for root the subprocess runs in a new user namespace (``unshare --user``),
    where files keep their owner but root's capabilities do not apply to them: the permission bits decide.
    """
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    command = [sys.executable, "-m", "clbench", *map(str, args)]
    if os.geteuid() == 0:
        probe = subprocess.run(["unshare", "--user", "true"], capture_output=True, text=True) \
            if shutil.which("unshare") else None
        if probe is None or probe.returncode != 0:
            pytest.skip("running as root, and `unshare --user` (util-linux) is not usable here, so no folder is "
                        f"read-only for the CLI ({probe.stderr.strip() if probe else 'no unshare command'})")
        command = ["unshare", "--user", *command]
    p = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=600)
    return p.returncode, p.stdout, p.stderr


def read_only_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


@pytest.fixture
def fashion_root(tmp_path):
    """A small Fashion-MNIST in the real IDX format."""
    return write_idx_dataset(tmp_path / "fm", train=600, test=200)


# ---- data loss: --output ---------------------------------------------------------------------
@pytest.mark.parametrize("where, message", [
    ("missing/r.json", "does not exist"),
    ("folder", "is a folder"),
])
def test_run_output_that_cannot_be_written_fails_before_training(clb, tmp_path, fresh_registry, where, message):
    (tmp_path / "folder").mkdir()
    code, out, err = clb("--plugin", plugin(tmp_path, MUST_NOT_TRAIN), "run", *TINY, "--strategy",
                         "test-must-not-train", "--output", tmp_path / where)
    one_line_error(code, err, "--output", message)


def test_run_output_in_a_read_only_folder_fails_before_training(tmp_path):
    folder = read_only_folder(tmp_path / "ro")
    code, out, err = cli_without_root("--plugin", plugin(tmp_path, MUST_NOT_TRAIN), "run", *TINY, "--strategy",
                                      "test-must-not-train", "--output", folder / "r.json")
    one_line_error(code, err, "cannot write in", str(folder))
    assert "TRAINING STARTED" not in err and not list(folder.iterdir())


def test_diverged_run_keeps_the_existing_output_and_writes_the_partial_result_beside_it(clb, tmp_path):
    out = tmp_path / "r.json"
    out.write_text('{"precious": true}')
    code, _, err = clb("run", *TINY, "--strategy-arg", "lr=1e6", "--strategy-arg", "epochs=3", "--output", out)
    line = one_line_error(code, err, "training loss became", str(tmp_path / "r.partial.json"), "not touched")
    assert out.read_text() == '{"precious": true}', line
    partial = json.loads((tmp_path / "r.partial.json").read_text())
    assert partial["complete"] is False and partial["R"][0][0] is not None


# ---- code execution: CIFAR pickles -----------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_cifar_batch_is_refused_and_its_payload_never_runs(tmp_path, cli):
    root = write_cifar(tmp_path / "c10")
    marker = tmp_path / "PAYLOAD_RAN"
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Payload(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ClbenchError, match=r"refusing to load CIFAR batch .*data_batch_1: it asks for posix\.system"):
        data.load("cifar10", root=root)
    code, _, err = cli("run", "--stream", "split-cifar10", "--stream-arg", f"root={root}", "--quiet")
    one_line_error(code, err, "refusing to load CIFAR batch", "nothing in it was run")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_cifar_batches_still_load_with_the_restricted_unpickler(tmp_path, protocol, monkeypatch):
    monkeypatch.setattr(pickle, "DEFAULT_PROTOCOL", protocol)  # write_cifar uses the default protocol
    root = write_cifar(tmp_path / "c100", hundred=True)
    loaded = data.load("cifar100", root=root)
    assert loaded["train_x"].shape == (500, 3, 32, 32) and loaded["train_x"].dtype == torch.uint8
    assert torch.equal(loaded["train_coarse"], loaded["train_y"] // 5)


# ---- silent wrong data: an explicit root -----------------------------------------------------
def test_explicit_root_is_the_only_place_looked(clb, tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "cache" / "fashion-mnist")  # a copy the old lookup fell back to
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ClbenchError, match="not found in root=.*the only place looked"):
        clbench.make_stream("permuted-fashion-mnist", root=str(empty))
    code, _, err = clb("run", "--stream", "permuted-fashion-mnist", "--stream-arg", f"root={empty}", "--quiet")
    one_line_error(code, err, f"not found in root='{empty}'", "only place looked")
    assert len(clbench.make_stream("permuted-fashion-mnist", tasks=1).tasks) == 1  # without a root: the cache


def test_provenance_records_each_file_used_with_its_checksum(clb, tmp_path, fashion_root):
    out = tmp_path / "r.json"
    code, _, err = clb("run", "--stream", "permuted-fashion-mnist", "--stream-arg", f"root={fashion_root}",
                       "--stream-arg", "tasks=2", "--strategy-arg", "epochs=1", "--device", "cpu", "--quiet",
                       "--output", out)
    assert code == 0, err
    used = json.loads(out.read_text())["config"]["provenance"]["data"]
    assert used["folder"] == str(fashion_root.resolve()) and len(used["files"]) == 4
    for f in used["files"]:
        path = Path(f["path"])
        assert path.parent == fashion_root.resolve()
        assert f["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and f["bytes"] == path.stat().st_size


# ---- silent override: plugin names -----------------------------------------------------------
CLASH = '''
from clbench import Strategy, register_strategy

@register_strategy("finetune"{replace})
class MyFinetune(Strategy):
    """A plugin's own finetune."""
    def extra_results(self):
        return {{"plugin_ran": True}}
'''


def test_a_plugin_cannot_take_a_builtin_name(clb, tmp_path, fresh_registry):
    code, _, err = clb("--plugin", plugin(tmp_path, CLASH.format(replace="")), "list")
    one_line_error(code, err, "'finetune' is already registered by clbench.strategies.finetune.Finetune",
                   "@register_strategy('finetune', replace=True)")
    assert registry.lookup("strategy", "finetune").__module__ == "clbench.strategies.finetune"


def test_a_plugin_replaces_a_builtin_only_when_it_says_so_and_it_is_reported(clb, tmp_path, fresh_registry):
    out = tmp_path / "r.json"
    code, _, err = clb("--plugin", plugin(tmp_path, CLASH.format(replace=", replace=True")), "run", *TINY,
                       "--strategy", "finetune", "--output", out)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clbench: warning: strategy 'finetune' of "
                                                   "clbench.strategies.finetune.Finetune is replaced by "
                                                   "clbench_plugin_plugin.MyFinetune"), err
    assert json.loads(out.read_text())["extra"]["plugin_ran"] is True


def test_registering_the_same_class_again_is_not_a_clash(tmp_path, fresh_registry):
    import importlib.util

    path = plugin(tmp_path, CLASH.format(replace="").replace('"finetune"', '"test-reimported"'))
    for _ in range(2):  # a module imported twice makes two class objects of the same identity
        spec = importlib.util.spec_from_file_location("clbench_plugin_reimported", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    assert registry.lookup("strategy", "test-reimported") is module.MyFinetune
    other = type("MyFinetune", (clbench.Strategy,), {"__module__": "somewhere_else"})
    with pytest.raises(ClbenchError, match="'test-reimported' is already registered"):
        clbench.register_strategy("test-reimported")(other)


# ---- silent nonsense -------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--strategy-arg", "epochs=0.5"], "epochs must be a whole number >= 0, e.g. epochs=5; got 0.5"),
    (["--strategy-arg", "epochs=abc"], "epochs must be a whole number >= 0, e.g. epochs=5; got 'abc'"),
    (["--strategy-arg", "lr=-1"], "lr must be a positive number"),
    (["--strategy-arg", "optimizer=adagrad"], "optimizer must be one of sgd, adam, adamw"),
    (["--model", "mlp", "--model-arg", "widths="], "'widths=' has no value after '='"),
    (["--model", "mlp", "--model-arg", "widths=(400,"], "'(400,' is not a valid value"),
    (["--model", "mlp", "--model-arg", "widths=abc"], "widths must be a list such as (1, 2) (default (400, 400)), "
                                                      "got 'abc'"),
    (["--model", "mlp", "--model-arg", "widths=(400, 0)"], "mlp widths must be hidden-layer sizes"),
    (["--strategy", "replay", "--strategy-arg", "buffer_size=-1"], "buffer_size must be a positive whole number"),
    (["--strategy", "l2", "--strategy-arg", "strength=abc"], "strength must be a number (default 1.0), got 'abc'"),
])
def test_bad_training_and_model_arguments_are_one_line(clb, fresh_registry, tmp_path, args, message):
    code, _, err = clb("--plugin", plugin(tmp_path, MUST_NOT_TRAIN), "run", *TINY,
                       *(["--strategy", "test-must-not-train"] if "--strategy" not in args else []), *args)
    one_line_error(code, err, message)


def test_model_arguments_alone_are_a_single_run_not_the_demo_that_would_ignore_them(clb):
    code, _, err = clb("run", "--model-arg", "widths=(400,", "--quiet")
    one_line_error(code, err, "'(400,' is not a valid value")


def test_more_samples_than_there_are_is_a_warning_that_says_what_was_used(clb, tmp_path, fashion_root):
    code, out, err = clb("run", "--stream", "permuted-fashion-mnist", "--stream-arg", f"root={fashion_root}",
                         "--stream-arg", "tasks=1", "--stream-arg", "train_samples=1000000", "--device", "cpu",
                         "--quiet")
    assert code == 0, err
    assert err.strip() == ("clbench: warning: train_samples=1000000 is more than the 600 that fashion-mnist's "
                           "training set has; using all 600")
    with pytest.warns(ClbenchWarning, match="test_samples=500 is more than the 200"):
        stream = clbench.make_stream("permuted-fashion-mnist", root=str(fashion_root), tasks=1, test_samples=500)
    assert stream.provenance["test_samples"] == 200


def test_empty_test_set_is_an_error_not_a_score_of_zero(clb, tmp_path, fashion_root):
    code, _, err = clb("run", "--stream", "split-fashion-mnist", "--stream-arg", f"root={fashion_root}",
                       "--stream-arg", "test_samples=3", "--quiet")
    one_line_error(code, err, "has no test samples", "ask for more test_samples")
    x = torch.zeros(4, 3)
    with pytest.raises(ClbenchError, match="task 1 has no test samples"):
        Stream("s", [Task(0, x, torch.zeros(4, dtype=torch.long), x[:0], torch.zeros(0, dtype=torch.long))],
               "domain", "ce", (3,), 2)


BASE_SWEEP = '[[stream]]\nname = "teacher-student"\n\n[[strategy]]\nname = "finetune"\n'


@pytest.mark.parametrize("top, entry, message", [
    ('seed = [3, 4]', "", "unknown key 'seed'; did you mean 'seeds'?"),
    ('devcie = "cpu"', "", "unknown key 'devcie'; did you mean 'device'?"),
    ('seeds = []', "", "seeds must be a non-empty list of integers"),
    ('seeds = ["a"]', "", "seeds must be a non-empty list of integers, e.g. seeds = [0, 1, 2]; got ['a']"),
    ("", '[[stream]]\nargs = { rho_a = 0.5 }', "[[stream]] entry 2 has no name"),
    ("", '[[strategy]]\nname = "l2"\narg = { strength = 1.0 }',
     "[[strategy]] entry 2: unknown key 'arg'; did you mean 'args'?"),
    ("", '[[stream]]\nname = "teacher-student"\nmodel_arg = { widths = 3 }',
     "[[stream]] entry 2: unknown key 'model_arg'; did you mean 'model_args'?"),
    ("", '[[strategy]]\nname = "l2"\nargs = { strength = [] }', "[[strategy]] 'l2': the axis strength = [] is empty"),
    ("", '[[stream]]\nname = "teacher-student"\nargs = { rho_a = [] }', "the axis rho_a = [] is empty"),
])
def test_sweep_files_that_would_run_another_grid_are_refused(clb, tmp_path, top, entry, message):
    spec = tmp_path / "s.toml"
    spec.write_text(f"{top}\n\n{BASE_SWEEP}\n{entry}\n")  # a bad entry is the second of its kind
    store = tmp_path / "store"
    code, _, err = clb("sweep", spec, "--store", store, "--quiet")
    one_line_error(code, err, f"sweep file {spec}", message)
    assert not store.exists()


# ---- tracebacks that are now one line --------------------------------------------------------
def test_store_that_is_a_file(clb, tmp_path):
    store = tmp_path / "results.json"
    store.write_text("{}")
    for args in (["sweep", "--stream", "teacher-student", "--strategy", "finetune", "--store", store, "--quiet"],
                 ["leaderboard", "--store", store, "--output", tmp_path / "lb.csv"],
                 ["plot", "similarity", "--store", store, "--output", tmp_path / "m.png"]):
        code, _, err = clb(*args)
        one_line_error(code, err, f"store {store} is a file, not a folder")


def test_data_download_into_a_data_folder_that_is_a_file(clb, tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "afile"))
    (tmp_path / "afile").write_text("")
    code, _, err = clb("data", "download", "mnist")
    one_line_error(code, err, f"the data folder ($CLBENCH_DATA) {tmp_path / 'afile'} is a file")


def test_data_download_into_a_read_only_data_folder(tmp_path):
    folder = read_only_folder(tmp_path / "ro")
    code, _, err = cli_without_root("data", "download", "mnist", env={"CLBENCH_DATA": str(folder)})
    one_line_error(code, err, f"cannot write in the data folder ($CLBENCH_DATA) {folder}")


@pytest.fixture
def result_json(tmp_path):
    path = tmp_path / "r.json"
    assert main(["run", *TINY, "--output", str(path)]) == 0
    return path


SWEEP = ["sweep", "--stream", "teacher-student", "--stream-arg", "input_dim=20", "--stream-arg", "latent_dim=4",
         "--stream-arg", "rho_a=0,1", "--stream-arg", "rho_b=0", "--strategy", "finetune", "--strategy-arg",
         "epochs=5", "--quiet"]


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    assert main([*SWEEP, "--store", str(path)]) == 0
    assert len(list(path.glob("*.json"))) == 2
    return path


def test_leaderboard_and_plot_output_into_a_missing_folder(clb, tmp_path, result_json, store):
    missing = tmp_path / "missing"
    assert clb("leaderboard", "--store", store, "--output", tmp_path / "lb.csv")[0] == 0
    for args in (["leaderboard", "--store", store], ["plot", "matrix", result_json],
                 ["plot", "similarity", "--store", store], ["plot", "leaderboard", tmp_path / "lb.csv"]):
        code, _, err = clb(*args, "--output", missing / "out")
        one_line_error(code, err, "--output", f"the folder {missing} does not exist")


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"\x89PNG\r\n\x1a\n\x00\x00garbage\xff", "is not a text file"),
    (b"stream,strategy,acc_mean\nteacher-student,finetune,0.5\n", "is not JSON"),
    (b"{}", "has no score matrix R"),
    (b"null", "has no score matrix R"),
    (b'{"R": [[0.1, 0.2]]}', "has no score matrix R"),
])
def test_plot_matrix_on_a_file_that_is_not_a_result(clb, tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_bytes(content)
    code, _, err = clb("plot", "matrix", path, "--output", tmp_path / "R.png")
    one_line_error(code, err, str(path), message)


def test_plot_similarity_on_an_empty_store_and_readers_create_no_store(clb, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = clb("plot", "similarity", "--store", empty, "--output", tmp_path / "m.png")
    one_line_error(code, err, f"no records in {empty}")
    missing = tmp_path / "no-such-store"
    for args in (["leaderboard", "--store", missing, "--output", tmp_path / "lb.csv"],
                 ["plot", "similarity", "--store", missing, "--output", tmp_path / "m.png"]):
        code, _, err = clb(*args)
        one_line_error(code, err, f"store {missing} does not exist")
        assert not missing.exists()


@pytest.mark.parametrize("content", ["{}", "null", '{"id": "x"', ""])
def test_corrupt_record_is_named_by_the_leaderboard_and_rerun_by_the_sweep(clb, tmp_path, store, content):
    victim = sorted(store.glob("*.json"))[1]
    good = victim.read_text()
    victim.write_text(content)
    code, _, err = clb("leaderboard", "--store", store, "--output", tmp_path / "lb.csv")
    one_line_error(code, err, f"corrupt record {victim}")
    code, out, err = clb(*SWEEP, "--store", store)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clbench: warning: corrupt record {victim} ("), err
    assert lines[0].endswith("; running its cell again") and "ran 1, skipped 1" in out
    assert json.loads(victim.read_text())["R"] == json.loads(good)["R"]  # the same run, done again


@pytest.mark.parametrize("source, message, line", [
    ("def broken(:\n    pass\n", "has a syntax error (", 1),
    ("import clbench\nraise RuntimeError('boom at import')\n", "raised RuntimeError: boom at import", 2),
    ("import module_that_does_not_exist_anywhere\n", "raised ModuleNotFoundError", 1),
])
def test_plugin_that_fails_to_import_is_one_line_with_its_line(clb, tmp_path, fresh_registry, source, message,
                                                                line):
    path = plugin(tmp_path, source, "bad_plugin.py")
    code, _, err = clb("--plugin", path, "list")
    one_line_error(code, err, f"plugin '{path}'", message, f"line {line}")


def test_bad_sample_count_and_mismatched_inputs_through_the_python_api(fashion_root):
    with pytest.raises(ClbenchError, match=r"train_samples must be a positive whole number .*got 2\.5"):
        clbench.make_stream("permuted-fashion-mnist", root=str(fashion_root), train_samples=2.5)
    g = torch.Generator().manual_seed(0)

    def task(i: int, dim: int) -> Task:
        return Task(i, torch.randn(8, dim, generator=g), torch.randint(0, 2, (8,), generator=g),
                    torch.randn(4, dim, generator=g), torch.randint(0, 2, (4,), generator=g))

    stream = Stream("mixed", [task(0, 6), task(1, 5)], "domain", "ce", (6,), 2, TrainDefaults(model="mlp"))
    with pytest.raises(ClbenchError, match=r"task 2's train inputs have shape \(5,\), but task 1 gives \(6,\)"):
        clbench.run(stream, clbench.make_strategy("finetune"), device="cpu", progress=False)


# ---- hangs -----------------------------------------------------------------------------------
def _vit_state(depth: int) -> dict[str, torch.Tensor]:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=28, patch_size=4,
                              in_chans=1, embed_dim=16, depth=depth, num_heads=2)
    return model.state_dict()


@pytest.mark.parametrize("saved, message", [
    ("no ViT", "does not hold a timm ViT's weights (no patch_embed.proj.weight; its keys: weight)"),
    ("a 1-block ViT", "does not match the backbone 'vit_tiny_patch16_224' (missing blocks.1."),
])
def test_l2p_checkpoint_whose_keys_do_not_match_is_an_error(tmp_path, saved, message):
    """The backbone asked for has 2 blocks; timm alone would log the mismatch and leave the rest random."""
    path = tmp_path / "vit.pth"
    torch.save({"weight": torch.zeros(3)} if saved == "no ViT" else {"state_dict": _vit_state(1)}, path)
    x = torch.randint(0, 255, (8, 1, 28, 28), dtype=torch.uint8)
    y = torch.arange(8) % 2
    stream = Stream("digits", [Task(0, x, y, x, y, classes=[0, 1])], "class", "ce", (1, 28, 28), 2,
                    TrainDefaults(model="linear"))
    strategy = clbench.make_strategy("l2p", backbone="vit_tiny_patch16_224", backbone_checkpoint=str(path),
                                     backbone_args={"img_size": 28, "patch_size": 4, "in_chans": 1,
                                                    "embed_dim": 16, "depth": 2, "num_heads": 2},
                                     pool_size=2, top_n=1, prompt_length=1)
    with pytest.raises(ClbenchError, match="backbone checkpoint") as info:
        clbench.run(stream, strategy, device="cpu", progress=False)
    assert message in str(info.value)


BLOCKING = '''
import os, time
from pathlib import Path
from clbench import Strategy, register_strategy

@register_strategy("test-block")
class Block(Strategy):
    """Says it started, then blocks (the test kills its sweep)."""
    def __init__(self, flag_dir: str = "", **train):
        super().__init__(**train)
        self.flag_dir = flag_dir

    def before_task(self, task):
        Path(self.flag_dir, f"{os.getpid()}.started").write_text("")
        time.sleep(3600)
'''


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_sweep_workers_exit_when_the_sweep_is_killed(tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sweep_proc = subprocess.Popen(
        [sys.executable, "-m", "clbench", "--plugin", str(plugin(tmp_path, BLOCKING)), "sweep", "--stream",
         "teacher-student", "--stream-arg", "input_dim=20", "--strategy", "test-block", "--strategy-arg",
         f"flag_dir={flags}", "--seeds", "0,1", "--jobs", "2", "--store", str(tmp_path / "store"), "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300  # generous: waits for both workers to start, however slow the machine
        while len(workers) < 2 and time.monotonic() < deadline and sweep_proc.poll() is None:
            time.sleep(0.1)
            workers = [int(p.name.split(".")[0]) for p in flags.glob("*.started")]
        assert len(workers) == 2, sweep_proc.stderr.read() if sweep_proc.poll() is not None else workers
        sweep_proc.send_signal(signal.SIGKILL)
        sweep_proc.wait()
        deadline = time.monotonic() + 120
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "sweep workers outlived the killed sweep"
    finally:
        for pid in [sweep_proc.pid] + workers:  # only the processes this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        sweep_proc.stderr.close()


def test_sweep_workers_that_watch_their_parent_still_finish_a_sweep(cli, tmp_path):
    code, out, err = cli(*SWEEP, "--jobs", "2", "--store", str(tmp_path / "store"))
    assert code == 0 and "2 cells, ran 2, skipped 0" in out, err
    records = [json.loads(p.read_text()) for p in (tmp_path / "store").glob("*.json")]
    assert len({r["worker"]["pid"] for r in records} - {os.getpid()}) >= 1  # ran in worker processes


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_long_stream_construction_and_runs_show_progress(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress, "DELAY", 0.0)  # a slow machine would show it after DELAY seconds
    stream = clbench.make_stream("teacher-student", tasks=1000, input_dim=4, latent_dim=2, output_dim=1)
    assert len(stream) == 1000
    assert "building teacher-student (1000 tasks)" in terminal.getvalue() and "1000/1000" in terminal.getvalue()
    short = clbench.make_stream("teacher-student", tasks=3, input_dim=4, latent_dim=2, output_dim=1)
    clbench.run(short, clbench.make_strategy("finetune", epochs=2), device="cpu", progress=True)
    shown = terminal.getvalue()
    assert "finetune on teacher-student" in shown and "evaluating after task 3/3" in shown and "100%" in shown
    with progress.quiet():
        before = terminal.getvalue()
        clbench.make_stream("teacher-student", tasks=50, input_dim=4, latent_dim=2, output_dim=1)
        assert terminal.getvalue() == before


# ---- bad defaults ----------------------------------------------------------------------------
def test_a_strategy_declares_its_own_training_defaults_and_list_shows_them(clb, fashion_root):
    stream = clbench.make_stream("permuted-fashion-mnist", root=str(fashion_root), tasks=1)
    at_defaults = clbench.run(stream, clbench.make_strategy("iru"), device="cpu", progress=False)
    assert (at_defaults.config["optimizer"], at_defaults.config["lr"]) == ("adam", 1e-3)
    assert np.isfinite(at_defaults.R).all() and at_defaults.R[1][0] > 0.6
    old = clbench.run(stream, clbench.make_strategy("iru", optimizer="sgd", lr=0.05), device="cpu", progress=False)
    assert old.R[1][0] < 0.5  # the stream's SGD at lr 0.05: what iru ran with before, and failed
    explicit = clbench.make_strategy("iru", lr=0.01)
    explicit.stream = stream
    assert explicit.settings()["lr"] == 0.01 and explicit.settings()["optimizer"] == "adam"  # explicit wins
    code, out, _ = clb("list")
    assert code == 0
    assert "training defaults: optimizer='adam', lr=0.001 (the rest from the stream)" in out.split("  iru ")[1]
    assert "training defaults: optimizer='adam' (the rest from the stream)" in out.split("  l2p ")[1]
