"""Interruption, divergence and files: Ctrl-C keeps every finished run, diverged runs are never stored as
complete, caches follow file contents, small files cannot make clbench allocate gigabytes, writes are
atomic and rescued, and bad input ends in one line."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import clbench
from clbench.core.errors import ClbenchError

ROOT = Path(__file__).resolve().parents[1]


def _sweep_until_first_records(store: Path, *args: str) -> tuple[int, str]:
    """Start `clbench sweep` (teacher-student, finetune, slow enough to interrupt), send SIGINT once its first
    record is on disk, and return its exit code and stderr."""
    cmd = [sys.executable, "-m", "clbench", "sweep", "--stream", "teacher-student", "--stream-arg", "input_dim=300",
           "--strategy", "finetune", "--strategy-arg", "epochs=40", "--strategy-arg", "batch_size=64",
           "--store", str(store), "--quiet", *args]
    # a shell's background job inherits SIGINT ignored, and Python then installs no handler: restore it
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not list(store.glob("*.json")) and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)  # a hang guard, not a timing assertion
    finally:
        p.kill()
    return p.returncode, err


@pytest.mark.parametrize("args, cells", [(("--jobs", "2", "--batch", "off"), 24), (("--batch", "auto"), 40)],
                         ids=["jobs-2", "default-batched"])
def test_ctrl_c_stops_a_sweep_and_keeps_every_finished_run(tmp_path, args, cells):
    store = tmp_path / "store"
    code, err = _sweep_until_first_records(store, "--seeds", ",".join(map(str, range(cells))), *args)
    assert code == 130, err
    records = sorted(store.glob("*.json"))
    stored = int(err.split("stored ")[1].split(" of ")[0])
    assert 0 < len(records) == stored < cells  # stopped before the queue was done, nothing finished lost
    assert "rerun the same command" in err and "in flight" in err
    for path in records:  # each a complete record
        assert json.loads(path.read_text())["metrics"]["acc"] is not None
    assert not [p for p in store.iterdir() if ".tmp-" in p.name]


def _ts(**kw):
    return clbench.make_stream("teacher-student", input_dim=60, latent_dim=6, output_dim=3, **kw)


def test_an_explosion_on_the_last_step_makes_the_run_diverged_not_complete(tmp_path, capsys):
    from clbench.cli.commands import main

    out = tmp_path / "r.json"
    code = main(["run", "--stream", "teacher-student", "--strategy", "finetune", "--strategy-arg", "lr=1e9",
                 "--strategy-arg", "epochs=1", "--quiet", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "diverged" in err and "lower the learning rate" in err
    assert not out.exists()
    partial = json.loads((tmp_path / "r.partial.json").read_text())
    assert partial["complete"] is False and all(v is not None for v in partial["R"][0])


class _PoisonLastStep(clbench.make_strategy("finetune").__class__):
    """Finetune whose very last optimizer step leaves a NaN weight (the loss before it was finite)."""

    def setup(self, model, stream):
        model = super().setup(model, stream)
        self.steps_left = len(stream.tasks) * self.settings()["epochs"]  # full batch: one step an epoch
        return model

    def after_step(self):
        self.steps_left -= 1
        if self.steps_left == 0:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")


def test_non_finite_weights_after_the_last_step_are_caught():
    with pytest.raises(clbench.TrainingDiverged, match="task 2: a weight became NaN") as e:
        clbench.run(_ts(), _PoisonLastStep(epochs=3), device="cpu", progress=False)
    assert e.value.partial.complete is False
    assert np.isfinite(np.array(e.value.partial.R[1], dtype=float)).all()  # the rows before it are kept


def test_batched_members_diverge_independently():
    from clbench.batched import Member, run_batched

    members = [Member(_ts(seed=s), clbench.make_strategy("finetune", lr=lr, epochs=2), s)
               for s, lr in ((0, 1e9), (1, 0.05), (2, 1e9))]
    results = run_batched(members, device="cpu")
    assert isinstance(results[0], clbench.TrainingDiverged) and isinstance(results[2], clbench.TrainingDiverged)
    alone = clbench.run(_ts(seed=1), clbench.make_strategy("finetune", lr=0.05, epochs=2), device="cpu",
                        seed=1, progress=False)
    np.testing.assert_allclose(results[1].R, alone.R, atol=1e-5)


def test_a_leaderboard_averages_and_counts_the_same_seeds_and_flags_diverged_ones(tmp_path):
    from clbench.experiments import sweep
    from clbench.experiments.store import Store
    from clbench.reporting import leaderboard

    store = Store(tmp_path / "s")
    cells = sweep.expand(sweep.inline_spec(["teacher-student"], {"input_dim": 60, "latent_dim": 6}, ["finetune"],
                                           {"epochs": 2}, [0, 1, 2]))
    sweep.run_sweep(cells, store, progress=False)
    records = sorted(store.records(), key=lambda r: r["cell"]["seed"])
    old = records[2]  # as a store written before divergence was checked keeps it
    old["metrics"]["acc"] = None
    store.write(old["id"], old)
    row = leaderboard.build(store).iloc[0]
    assert row["n_seeds"] == 2 and row["diverged_seeds"] == 1
    assert row["acc_mean"] == pytest.approx(np.mean([r["metrics"]["acc"] for r in records[:2]]))
    assert row["bwt_mean"] == pytest.approx(np.mean([r["metrics"]["bwt"] for r in records[:2]]))
    from clbench.reporting.report import format_table, ranked

    table = ranked(leaderboard.runs_table(store))
    assert table.loc[0, "n_seeds"] == 2 and table.loc[0, "diverged_seeds"] == 1
    assert "1 seed(s) diverged" in format_table(table)


def test_a_stale_decoded_cache_is_never_used_for_a_rewritten_file(tmp_path, monkeypatch):
    from fake_data import idx_bytes, write_idx_dataset

    from clbench.data import datasets as data

    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    root = write_idx_dataset(tmp_path / "raw", train=50, test=20, gz=False)
    first = data.load("mnist", root=root)
    labels = root / "t10k-labels-idx1-ubyte"
    stat = labels.stat()
    new = (first["test_y"].numpy() + 1) % 10  # same size, other contents
    labels.write_bytes(idx_bytes(new.astype(np.uint8)))
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p / rsync -t leave it
    assert labels.stat().st_size == stat.st_size and labels.stat().st_mtime_ns == stat.st_mtime_ns
    second = data.load("mnist", root=root)
    assert second["test_y"].tolist() == new.tolist()
    assert second["source"]["files"] != first["source"]["files"]  # provenance and tensors agree


def test_a_gzipped_idx_file_declaring_a_huge_array_is_refused_from_its_header(tmp_path):
    from clbench.data import datasets as data

    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (60000 * 100, 28, 28))
    with gzip.open(path, "wb") as f:  # a few kB on disk, 4.7 GB decompressed
        f.write(header)
        for _ in range(20):
            f.write(bytes(1 << 20))
    read = []
    real_open = gzip.open

    class Counting:
        def __init__(self, *a):
            self.f = real_open(*a)

        def read(self, n=-1):
            out = self.f.read(n)
            read.append(len(out))
            return out

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    gzip.open = Counting
    try:
        with pytest.raises(ClbenchError, match=r"declares an array of shape \(6000000, 28, 28\).*at most \(60000, 28, 28\)"):
            data.read_idx(path, "mnist", (60000, 28, 28))
    finally:
        gzip.open = real_open
    assert sum(read) == len(header)  # nothing decompressed beyond the header


def test_an_l2p_checkpoint_whose_metadata_names_a_large_vit_is_refused_before_building_it(tmp_path, monkeypatch):
    import timm

    from clbench.strategies.l2p import load_backbone

    path = tmp_path / "tiny.pth"
    state = {"patch_embed.proj.weight": torch.zeros(2, 1, 4, 4), "cls_token": torch.zeros(1, 1, 2)}
    torch.save({"state_dict": state, "clbench": {"backbone": "vit_base_patch16_224",
                                                  "backbone_args": {"img_size": 224}}}, path)
    assert path.stat().st_size < 4000
    built = []
    real = timm.create_model

    def create(*a, **kw):
        model = real(*a, **kw)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(timm, "create_model", create)
    with pytest.raises(ClbenchError, match="does not match the backbone 'vit_base_patch16_224'"):
        load_backbone(None, None, str(path), False)
    assert built == ["meta"]  # shapes compared on a model without memory; no real ViT-B was allocated


def test_a_sweep_cleans_only_the_temporary_files_of_writers_that_are_gone(tmp_path):
    import socket

    from clbench.experiments.store import Store

    store = Store(tmp_path / "s")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    try:
        mine = store.root / f"a.json.tmp-{live.pid}@{host}"   # another sweep's write in flight
        gone = store.root / f"b.json.tmp-{dead.pid}@{host}"   # left by a killed sweep
        elsewhere = store.root / f"c.json.tmp-{dead.pid}@not-{host}"  # a shared folder: another host's
        for p in (mine, gone, elsewhere):
            p.write_text("{")
        store.remove_partial()
        assert mine.exists() and not gone.exists() and elsewhere.exists()
    finally:
        live.kill()


def test_a_full_disk_mid_sweep_rescues_the_finished_records(tmp_path):
    import errno

    from clbench.experiments import sweep
    from clbench.experiments.store import Store

    class FillsUp(Store):
        def write(self, run_id, record):
            if len(list(self.root.glob("*.json"))) >= 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            super().write(run_id, record)

    store = FillsUp(tmp_path / "s")
    cells = sweep.expand(sweep.inline_spec(["teacher-student"], {"input_dim": 60, "latent_dim": 6}, ["finetune"],
                                           {"epochs": 2}, [0, 1, 2]))
    with pytest.raises(ClbenchError, match="No space left on device.*2 finished records were written to") as e:
        sweep.run_sweep(cells, store, progress=False, batch="off")
    rescue = Path(str(e.value).split("written to ")[1].split(" instead")[0])
    ids = {p.stem for p in store.root.glob("*.json")} | {p.stem for p in rescue.glob("*.json")}
    assert ids == {sweep.cell_id(c) for c in cells}
    assert all(r["metrics"]["acc"] is not None for r in Store(rescue).records())


def test_the_demo_output_is_atomic_and_rescued(tmp_path, monkeypatch, capsys):
    import errno

    from clbench.cli import commands as cli_main
    from clbench.core import io

    monkeypatch.setattr(cli_main, "DEMO_GRID", (0.5,))
    monkeypatch.setattr(cli_main, "DEMO_SEEDS", 1)
    monkeypatch.setattr(cli_main, "DEMO_STRATEGIES", [("finetune", "finetune", {})])
    out = tmp_path / "demo.json"
    real = io.atomic_write

    def full(path, content):
        if Path(path) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, content)

    monkeypatch.setattr(io, "atomic_write", full)
    assert cli_main.main(["run", "--quiet", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and not out.exists()
    rescue = Path(err.split("saved to ")[1].split(" instead")[0])
    assert json.loads(rescue.read_text())[0]["strategy"] == "finetune"


def test_ctrl_c_or_a_plugin_error_in_a_run_keeps_the_finished_rows(tmp_path, capsys):
    from clbench.cli.commands import main

    plugin = tmp_path / "stops.py"
    plugin.write_text(
        "from clbench import register_strategy\nfrom clbench.strategies.finetune import Finetune\n"
        "@register_strategy('stops-at-task-2')\nclass Stops(Finetune):\n"
        "    '''Finetune that is interrupted (or fails) when task 2 starts.'''\n"
        "    def __init__(self, how='interrupt', **kw):\n        super().__init__(**kw)\n        self.how = how\n"
        "    def before_task(self, task):\n        if task.id == 1:\n"
        "            raise KeyboardInterrupt if self.how == 'interrupt' else RuntimeError('plugin bug')\n"
        "        super().before_task(task)\n")
    for how, code in (("interrupt", 130), ("fail", 1)):
        out = tmp_path / f"{how}.json"
        assert main(["--plugin", str(plugin), "run", "--stream", "teacher-student", "--strategy", "stops-at-task-2",
                     "--strategy-arg", f"how={how}", "--quiet", "--output", str(out)]) == code
        assert "rows computed so far" in capsys.readouterr().err and not out.exists()
        partial = json.loads((tmp_path / f"{how}.partial.json").read_text())
        assert partial["complete"] is False and len([r for r in partial["R"] if None not in r]) == 2


def test_reproduce_refuses_to_overwrite_a_readme_it_did_not_write(tmp_path, capsys):
    from clbench.cli.commands import main

    (tmp_path / "README.md").write_text("# my project\n")
    assert main(["reproduce", "hiratani2024", "--quick", "--output", str(tmp_path)]) == 2
    assert "not a report written by `clbench reproduce`" in capsys.readouterr().err
    assert (tmp_path / "README.md").read_text() == "# my project\n"


def test_a_plugins_sys_exit_fails_its_cell_and_the_serial_sweep_goes_on(tmp_path):
    from clbench.core.registry import register_strategy
    from clbench.experiments import sweep
    from clbench.experiments.store import Store
    from clbench.strategies.finetune import Finetune

    @register_strategy("exits-on-seed-1")
    class Exits(Finetune):
        """Finetune that calls sys.exit on seed 1."""

        def setup(self, model, stream):
            if stream.provenance.get("seed") == 1:
                sys.exit(3)
            return super().setup(model, stream)

    cells = sweep.expand(sweep.inline_spec(["teacher-student"], {"input_dim": 60, "latent_dim": 6},
                                           ["exits-on-seed-1"], {"epochs": 1}, [0, 1, 2]))
    store = Store(tmp_path / "s")
    with pytest.raises(ClbenchError, match=r"1 of 3 runs failed.*sys.exit\(3\)"):
        sweep.run_sweep(cells, store, progress=False, batch="off")
    assert len(list(store.records())) == 2


def test_pretraining_that_diverges_writes_no_checkpoint(tmp_path):
    from clbench.models.pretrain import pretrain

    out = tmp_path / "vit.pth"
    with pytest.raises(ClbenchError, match="pretraining diverged.*lower --lr"):
        pretrain(out, samples=64, epochs=1, batch_size=32, lr=1e9, embed_dim=16, depth=1, num_heads=2,
                 log=lambda _: None)
    assert not out.exists()


def test_jobs_and_threads_are_capped_with_a_warning(tmp_path):
    from clbench.core.errors import ClbenchWarning, cpu_limit
    from clbench.experiments import sweep
    from clbench.experiments.store import Store

    with pytest.warns(ClbenchWarning, match="--threads 100000 is more than the"):
        assert cpu_limit("--threads", 100000, "threads") <= os.cpu_count()
    cells = sweep.expand(sweep.inline_spec(["teacher-student"], {"input_dim": 60, "latent_dim": 6}, ["finetune"],
                                           {"epochs": 1}, [0, 1]))
    with pytest.warns(ClbenchWarning, match="--jobs"):
        sweep.run_sweep(cells, Store(tmp_path / "s"), progress=False, batch="off", jobs=64)


def _bad_idx(tmp_path: Path, header: bytes | None) -> str:
    from fake_data import write_idx_dataset

    root = write_idx_dataset(tmp_path / "idx", train=50, test=20, gz=False)
    if header is not None:
        (root / "t10k-labels-idx1-ubyte").write_bytes(header)
    return f"root={root}"


BAD = {
    "activity-gating alpha with no active unit": (["run", "--strategy", "activity-gating", "--strategy-arg",
                                                   "alpha=1e-9"], "alpha=1e-09 leaves"),
    "adaptive-gating probe_samples=0": (["run", "--strategy", "adaptive-gating", "--strategy-arg", "probe_samples=0"],
                                        "probe_samples must be at least 1"),
    "si c < 0": (["run", "--strategy", "si", "--strategy-arg", "c=-1"], "c must be a finite number >= 0"),
    "permuted rho_a that moves no pixel": (["run", "--stream", "permuted-mnist", "--stream-arg", "rho_a=0.999",
                                            "--stream-arg", "IDX"], "rho_a=0.999 moves no pixel"),
    "idx header with 200 dimensions": (["run", "--stream", "permuted-mnist", "--stream-arg", "BAD-NDIM"],
                                       "truncated \\(header cut short\\)"),
    "idx header declaring 4e9 labels": (["run", "--stream", "permuted-mnist", "--stream-arg", "BAD-HUGE"],
                                        "declares an array of shape \\(4294967295,\\)"),
    "pretrain heads not dividing embed-dim": (["pretrain", "--embed-dim", "10", "--heads", "3", "--output", "OUT"],
                                              "--embed-dim 10 must be a multiple of --heads 3"),
    "pretrain batch size 0": (["pretrain", "--batch-size", "0", "--output", "OUT"], "--batch-size must be"),
    "pretrain lr < 0": (["pretrain", "--lr", "-1", "--output", "OUT"], "--lr must be a finite number > 0"),
    "pretrain depth 0": (["pretrain", "--depth", "0", "--output", "OUT"], "--depth must be"),
    "leaderboard --html a folder": (["leaderboard", "--store", "STORE", "--output", "OUT", "--html", "TMP"],
                                    "--html .* is a folder"),
    "CLBENCH_DATA a file": (["run", "--stream", "permuted-mnist", "ENV:CLBENCH_DATA=FILE"],
                            "the data folder \\(\\$CLBENCH_DATA\\) .* is a file"),
    "CLBENCH_BATCH_MEMORY_MB not a number": (["run", "ENV:CLBENCH_BATCH_MEMORY_MB=lots"],
                                             "\\$CLBENCH_BATCH_MEMORY_MB='lots' must be a number"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_error(name, tmp_path, monkeypatch, capsys):
    from clbench.cli.commands import main

    argv, message = BAD[name]
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    replace = {"OUT": str(tmp_path / "out.x"), "TMP": str(tmp_path), "FILE": str(tmp_path / "file"),
               "STORE": str(ROOT / "leaderboards" / "results" / "teacher_student")}
    headers = {"IDX": None, "BAD-NDIM": bytes([0, 0, 8, 200]) + bytes(9),
               "BAD-HUGE": bytes([0, 0, 8, 1]) + (2**32 - 1).to_bytes(4, "big")}
    for key, header in headers.items():
        if key in argv:  # a dataset in the real format, one file's header replaced
            replace[key] = _bad_idx(tmp_path, header)
    (tmp_path / "file").write_text("not a folder")
    args = []
    for a in argv:
        if a.startswith("ENV:"):
            key, value = a[4:].split("=")
            monkeypatch.setenv(key, replace.get(value, value))
        else:
            args.append(replace.get(a, a))
    assert main(args + (["--quiet"] if args[0] == "run" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clbench: error: ")
    assert __import__("re").search(message, err[0]), err[0]
