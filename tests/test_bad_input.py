"""Bad input, the way users and clusters produce it: one error line, no traceback, nothing left behind, and
no checkpoint able to choose the code that runs."""
import fcntl
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from simt import checkpoint, pipeline
from tests.conftest import FAST, ROOT, child_env, fast, make_cfg, run_cli

SEED_RANGE = "an integer in 0..9,223,372,036,854,775,807"
FLOAT32 = "a number in (0, 3.403e+38] (finite in float32)"

# Value -> the one-line error. Each once crashed with a traceback, ran for ever, or asked for terabytes.
PROBES = [
    ("seed=99999999999999999999", f"seed=99999999999999999999: expected {SEED_RANGE}"),
    ("seed=-1", f"seed=-1: expected {SEED_RANGE}"),
    ("trainer.episode_seed=99999999999999999999", f"trainer.episode_seed=99999999999999999999: expected {SEED_RANGE}"),
    ("trainer.threads=1e20", "trainer.threads=1e+20: expected null or an integer in 1.."),
    (f"trainer.threads={(os.cpu_count() or 1) + 1}", "expected null or an integer in 1.."),
    ("trainer.lr=1e300", f"trainer.lr=1e+300: expected {FLOAT32}"),
    ("algo.inner_lr=1e300", f"algo.inner_lr=1e+300: expected {FLOAT32}"),
    ("simt.temp=1e300", f"simt.temp=1e+300: expected {FLOAT32}"),
    ("task.meta_batch_size=100000000000000000000", "task.meta_batch_size=100000000000000000000: expected an integer in "
                                                   "1..1,024 (1,024 tasks of 5 ways x 16 images at 84x84x3 are 6.9 GB"),
    ("trainer.eval_tasks=100000000000000000000", "trainer.eval_tasks=100000000000000000000: expected an integer in "
                                                 "2..1,000,000"),
    ("trainer.val_tasks=100000000", "trainer.val_tasks=100000000: expected an integer in 2..1,000,000"),
    ("dataset.image_size=100000", "dataset.image_size=100000: expected an integer in 16..1,024 (Conv4 max-pools 4 "
                                  "times; a 1024x1024 image's first activations take 268 MB"),
    ("backbone.hidden=1000000", "backbone.hidden=1000000: expected an integer in 1..4,096 (a 4096-channel 3x3 "
                                "convolution holds 604 MB of weights)"),
    ("algo.inner_steps=100000", "algo.inner_steps=100000: expected an integer in 0..1,000"),
    ("trainer.steps=10000000000", "trainer.steps=10000000000: expected an integer in 1..1,000,000,000"),
    ("dataset.split_classes.train=10000000", "dataset.split_classes.train=10000000: expected an integer in 1..100,000"),
    ("data_dir=''", "data_dir='': expected a non-empty folder path"),
    ("simt.eta=1.5", "simt.eta=1.5: expected a number in [0, 1]"),
    ("simt.eta_schedule=nope", "simt.eta_schedule='nope': expected one of constant, warmup"),
    ("compat=nope", "compat='nope': expected one of official, paper"),
]


@pytest.mark.parametrize("override,message", PROBES)
def test_a_bad_value_is_one_line_and_leaves_no_run_directory(override, message, tmp_path, monkeypatch, capsys):
    """run.py's own entry point, in this process (a subprocess per probe would cost seconds each)."""
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["run.py", *FAST, override, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    stderr = capsys.readouterr().err
    assert exit.value.code == 2 and stderr.startswith("error: ") and message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not run_dir.exists()


def test_a_run_directory_only_hydra_can_resolve_is_left_to_hydra(tmp_path):
    run_dir = f"{tmp_path}/${{hydra:runtime.choices.algo}}"
    assert pipeline.check_command_line([*FAST, f"hydra.run.dir={run_dir}"]) is None
    assert pipeline.check_command_line([*FAST, f"hydra.run.dir={tmp_path}/plain"]) == f"{tmp_path}/plain"


@pytest.mark.parametrize("args,message", [
    (["seed=99999999999999999999"], f"error: seed=99999999999999999999: expected {SEED_RANGE}"),
    (["simt.eta=1.5"], "error: simt.eta=1.5: expected a number in [0, 1]"),
    (["simt.eta_schedule=nope"], "error: simt.eta_schedule='nope': expected one of constant, warmup"),
    # Found after Hydra has made the directory (the data set is read to find it): the directory goes too.
    (["dataset=miniimagenet", "data_dir=/nonexistent"], "error: "),
])
def test_the_command_prints_one_line_and_leaves_no_run_directory(args, message, tmp_path):
    run_dir = tmp_path / "D"
    result = run_cli(*FAST, *args, f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_an_unusable_run_directory_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_cli(*FAST, f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: hydra.run.dir='{tmp_path / 'file' / 'run'}': expected a folder "
                                            f"this user can create and write ({tmp_path / 'file'} is not a folder)")


# -- checkpoints never choose code --------------------------------------------------------------------

def _crafted_checkpoint(path: Path, **config_changes) -> Path:
    """A best.pt of strings and dicts only (it passes weights_only loading) whose config names other code."""
    config = OmegaConf.to_container(make_cfg(*fast()), resolve=True)
    config.update(config_changes)
    torch.save({"config": config, "learner": {}, "target": None}, path)
    return path


def _opens(victim: Path) -> dict:
    return {"_target_": "builtins.open", "file": str(victim), "mode": "w"}


@pytest.mark.parametrize("crafted_dataset", [
    _opens,
    lambda victim: {"_target_": "torch.load", "weights_only": False,
                    "f": {"_target_": "io.BytesIO", "initial_bytes": {"_target_": "base64.b64decode", "s": "AAAA"}}},
    lambda victim: {"_target_": "simt.data.synthetic.synthetic", "seed": {"_target_": "torch.load", "f": str(victim)}},
    lambda victim: {"_target_": "simt.data.synthetic.synthetic", "split_classes": [_opens(victim)]},
    lambda victim: {"_target_": "simt.data.synthetic.synthetic", "extra": (_opens(victim),)},  # a tuple: weights_only keeps it
], ids=["open", "torch-load", "nested-under-our-own", "in-a-list", "in-a-tuple"])
def test_a_crafted_checkpoint_cannot_name_code(crafted_dataset, tmp_path):
    victim = tmp_path / "victim"
    crafted = _crafted_checkpoint(tmp_path / "best.pt", dataset=crafted_dataset(victim))
    with pytest.raises(pipeline.CheckpointError, match="refused, its config sets .*_target_="):
        pipeline.trusted_saved_config(checkpoint.load(crafted)["config"], crafted)
    assert not victim.exists()


def test_mode_eval_refuses_a_crafted_checkpoint_in_one_line(tmp_path):
    victim, run_dir = tmp_path / "victim", tmp_path / "eval"
    crafted = _crafted_checkpoint(tmp_path / "best.pt", dataset=_opens(victim))
    result = run_cli("mode=eval", f"checkpoint={crafted}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: checkpoint {crafted}: refused, its config sets dataset._target_="
                                    f"'builtins.open', which is not one of this project's config options")
    assert not victim.exists() and not run_dir.exists()


@pytest.mark.parametrize("change,message", [
    ({"algo": {"_target_": "os.system", "command": "true"}}, "refused, its config sets algo._target_='os.system'"),
    ({"trainer": {"_partial_": True}}, "refused, its config sets trainer._partial_=True"),
    ({"data_dir": "${oc.env:HOME}"}, "refused, its config has an interpolation at data_dir"),
    ({"seed": -5}, "refused, its config fails a check: seed=-5"),
])
def test_a_saved_config_builds_only_the_projects_own_objects(change, message, tmp_path):
    config = OmegaConf.to_container(make_cfg(*fast()), resolve=True)
    with pytest.raises(pipeline.CheckpointError, match=message.replace("(", r"\(").replace("$", r"\$")):
        pipeline.trusted_saved_config({**config, **change}, tmp_path / "best.pt")


def test_a_checkpoint_trained_elsewhere_is_checked_with_this_machines_run_keys(tmp_path):
    config = OmegaConf.to_container(make_cfg(*fast()), resolve=True)
    config["trainer"]["threads"] = 4096  # trained on a bigger machine
    with pytest.raises(pipeline.CheckpointError, match="trainer.threads=4096"):
        pipeline.trusted_saved_config(config, tmp_path / "best.pt")
    saved = pipeline.trusted_saved_config(config, tmp_path / "best.pt", {"trainer": {"threads": None}})
    assert saved.trainer.threads is None


def test_an_argument_a_constructor_does_not_take_is_one_line():
    with pytest.raises(pipeline.BuildError, match=r"^simt.data.synthetic.synthetic: .*unexpected keyword argument 'extra'"):
        pipeline.build(make_cfg(*fast("+dataset.extra=1")))


def test_every_group_option_of_conf_is_trusted():
    for option in ("maml", "metasgd", "protonet"):
        pipeline.trusted_saved_config(OmegaConf.to_container(make_cfg(*fast(f"algo={option}")), resolve=True), "x")
    assert "simt.data.kanji.kanji_dataset" in pipeline.own_targets()["dataset"]


# -- a refused process leaves a live run's record alone -----------------------------------------------

def test_a_process_refused_by_a_live_run_does_not_rewrite_its_config(tmp_path):
    record = tmp_path / ".hydra" / "config.yaml"
    record.parent.mkdir()
    record.write_text("simt:\n  lam: 0.5\n")
    with open(tmp_path / checkpoint.LOCK, "a") as lock:  # as a live training process holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cli(*FAST, "simt.lam=0.3", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "is in use by another process" in result.stderr
    assert record.read_text() == "simt:\n  lam: 0.5\n"
    assert not (tmp_path / ".hydra" / "overrides.yaml").exists()


def test_a_refused_resume_does_not_rewrite_the_runs_config(tmp_path):
    assert run_cli(*FAST, f"hydra.run.dir={tmp_path}").returncode == 0
    written = {name: (tmp_path / ".hydra" / name).read_text() for name in ("config.yaml", "overrides.yaml")}
    assert "lam: 0.5" in written["config.yaml"]
    result = run_cli(*FAST, "simt.lam=0.3", "trainer.resume=true", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and result.stderr.startswith("error: simt.lam=0.3: expected 0.5 as in the checkpoint")
    assert {name: (tmp_path / ".hydra" / name).read_text() for name in written} == written


def test_a_run_directory_that_existed_is_never_removed(tmp_path):
    (tmp_path / "mine").mkdir()
    result = run_cli("mode=eval", f"checkpoint={tmp_path / 'none.pt'}", f"hydra.run.dir={tmp_path / 'mine'}")
    assert result.returncode == 2 and "none.pt" in result.stderr
    assert (tmp_path / "mine").is_dir()


def test_mode_eval_does_not_write_into_a_live_runs_directory(tmp_path):
    with open(tmp_path / checkpoint.LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cli("mode=eval", f"checkpoint={tmp_path}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "is in use by another process" in result.stderr
    assert not (tmp_path / ".hydra").exists()


@pytest.mark.parametrize("config", [{"trainer": "x"}, "x", None])
def test_a_last_checkpoint_with_a_foreign_config_is_one_line(config, tmp_path):
    pipeline.run(make_cfg(*fast()), tmp_path)
    last = checkpoint.load(tmp_path / checkpoint.LAST)
    last["config"] = config
    torch.save(last, tmp_path / checkpoint.LAST)
    with pytest.raises(pipeline.CheckpointError, match=r"does not fit this run \(its config is not a run config\)"):
        pipeline.run(make_cfg(*fast("trainer.steps=6", "trainer.resume=true")), tmp_path)
    assert "its config is not a run config" in pipeline.resume_problem(make_cfg(*fast("trainer.resume=true")), tmp_path)


def test_named_sweeps_are_found_from_any_directory(tmp_path):
    import subprocess

    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "-m", "hydra/sweeper=optuna", "hydra.sweeper.sweep=simt_quick",
         "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", "algo.inner_steps=1", "algo.eval_inner_steps=1"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sweep finished: 1 complete" in result.stdout


def test_checkpoints_that_do_not_fit_the_run_are_one_line(tmp_path):
    pipeline.run(make_cfg(*fast()), tmp_path)
    last = checkpoint.load(tmp_path / checkpoint.LAST)
    del last["optimizer"]
    torch.save(last, tmp_path / checkpoint.LAST)
    with pytest.raises(pipeline.CheckpointError, match=r"last.pt: does not fit this run \(missing key 'optimizer'\)"):
        pipeline.run(make_cfg(*fast("trainer.steps=6", "trainer.resume=true")), tmp_path)
    best = checkpoint.load(tmp_path / checkpoint.BEST)
    best["learner"]["model"]["classifier.weight"] = torch.zeros(1)
    torch.save(best, tmp_path / "other.pt")
    with pytest.raises(pipeline.CheckpointError, match=r"other.pt: does not fit this run \(RuntimeError: .*size mismatch"):
        pipeline.evaluate_saved(make_cfg(*fast("mode=eval", f"checkpoint={tmp_path / 'other.pt'}")), tmp_path / "eval")
