"""The Optuna sweeper: search-space parsing, study bookkeeping, pruning, faults, resume, parallel and
distributed sweeps (journal file and a real PostgreSQL server), and the files a sweep leaves."""
import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from glob import glob
from pathlib import Path

import optuna
import pytest
import yaml
from omegaconf import OmegaConf
from optuna.trial import TrialState

from conftest import ROOT, child_env, fast, make_cfg, run_cli
from simt import checkpoint, pipeline
from simt.sweeping import study as study_mod
from simt.sweeping.study import (INTERRUPTED, OWNER, HEARTBEAT, PRUNER_ATTR, RESUME, RETRIES, RETRY_OF, RUN_DIR,
                                 SweepError, TrialReporter, claim_trials, fail_interrupted, make_pruner, make_sampler)
from simt.sweeping.sweep import (DEFAULTS, as_override, corners, default_study_name, load_settings,
                                 parse_space, place_retry, record, reseeded, tell, trial_overrides)

QUICK = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.sweep=simt_quick"]


def sweep_cli(tmp: Path, *args: str, storage: str | None = None, timeout: float = 600, **popen):
    storage = storage or f"sqlite:///{tmp}/studies.db"
    return run_cli(*QUICK, f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp}/sweep", *args,
                   timeout=timeout, **popen)


def load(storage: str, name: str = "simt_quick") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=study_mod.open_storage(storage))


# -- search space and settings ----------------------------------------------------------------------

def test_search_space_syntax_and_command_line_precedence():
    file_params = {"simt.enabled": True, "simt.eta": "interval(0.9, 0.999)", "simt.lam": "interval(0.1, 1.0)",
                   "simt.drop_p": "interval(0.0, 0.5)"}
    space = parse_space(file_params, ["simt.lam=tag(log, interval(0.01, 1))", "simt.drop_p=0.1",
                                      "algo=choice(maml,anil)", "task.shots=range(1,6,2)",
                                      "trainer.steps=tag(int, interval(10, 20))", "seed=0,1"])
    d = space.distributions
    assert d["simt.eta"] == optuna.distributions.FloatDistribution(0.9, 0.999)
    assert d["simt.lam"] == optuna.distributions.FloatDistribution(0.01, 1.0, log=True)  # the CLI won
    assert d["algo"] == optuna.distributions.CategoricalDistribution(["maml", "anil"])
    assert d["task.shots"] == optuna.distributions.IntDistribution(1, 5, step=2)
    assert d["trainer.steps"] == optuna.distributions.IntDistribution(10, 20)
    assert d["seed"] == optuna.distributions.CategoricalDistribution([0, 1])
    assert "simt.drop_p" not in d and "simt.drop_p=0.1" in space.fixed  # a plain value fixes the key
    assert space.fixed[0] == "simt.enabled=true"
    assert space.question == ["simt.drop_p=0.1"]  # only the command line's fixed values name the study
    assert default_study_name("simt", space.question) == "simt[simt.drop_p=0.1]"


def test_corners_compose_and_validate_against_the_real_config():
    space = parse_space({}, ["simt.eta=interval(0.9, 1.0)", "algo=choice(maml,protonet)"])
    points = corners(space)
    assert ["simt.eta=0.9", "algo=maml"] in points and ["simt.eta=1.0", "algo=maml"] in points
    assert ["simt.eta=0.9", "algo=protonet"] in points
    for overrides in points:
        pipeline.check_config(make_cfg(*overrides))


def test_override_values_survive_hydras_parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    for value in [0.123456789012345, 3, True, None, "maml", "sqlite:////tmp/a b/x.db", "it's"]:
        parsed = OverridesParser.create().parse_override(as_override("key", value))
        assert parsed.value() == value


def test_settings_layers_defaults_file_then_command_line(tmp_path):
    (tmp_path / "mine.yaml").write_text("n_trials: 7\nsampler: {name: tpe, seed: 3}\nparams: {simt.eta: 0.9}\n")
    settings, params = load_settings({"sweep": "mine", "n_trials": None, "sampler": {"seed": 5}, "pruner": "none"},
                                     tmp_path)
    assert settings["n_trials"] == 7 and settings["sampler"] == {"name": "tpe", "seed": 5}
    assert settings["pruner"] == "none" and settings["storage"] == DEFAULTS["storage"]
    assert params == {"simt.eta": 0.9}
    with pytest.raises(SweepError, match="no file .*nope.yaml"):
        load_settings({"sweep": "nope"}, tmp_path)
    (tmp_path / "typo.yaml").write_text("n_trails: 3\n")
    with pytest.raises(SweepError, match="unknown key.*n_trails"):
        load_settings({"sweep": "typo"}, tmp_path)


def test_every_named_sweep_parses_and_validates():
    sweeps = sorted((ROOT / "sweeps").glob("simt*.yaml"))
    assert sweeps
    for path in sweeps:
        settings, params = load_settings({"sweep": path.stem}, ROOT / "sweeps")
        space = parse_space(params, [])
        assert {"simt.eta", "simt.lam", "simt.drop_p"} <= set(space.distributions)
        make_sampler(settings["sampler"], space.distributions)
        make_pruner(settings["pruner"])
        for overrides in corners(space):
            pipeline.check_config(make_cfg(*overrides))


def test_samplers_pruners_and_seeds():
    space = parse_space({}, ["a=choice(x,y)", "b=range(0,3)"])
    grid = make_sampler("grid", space.distributions)
    assert isinstance(grid, optuna.samplers.GridSampler)
    with pytest.raises(SweepError, match="grid sampler needs choice"):
        make_sampler("grid", parse_space({}, ["a=interval(0,1)"]).distributions)
    with pytest.raises(SweepError, match="sampler.name='anneal'"):
        make_sampler({"name": "anneal"}, {})
    with pytest.raises(SweepError, match="pruner.name='early'"):
        make_pruner("early")
    assert isinstance(make_pruner(None), optuna.pruners.NopPruner)
    assert reseeded({"name": "tpe", "seed": 3}, 4) == {"name": "tpe", "seed": 7}
    assert reseeded("random", 4) == {"name": "random"}


def test_direction_follows_the_metric():
    assert pipeline.objective_direction(make_cfg()) == "maximize"
    for dataset in ("kanji_pose", "shapenet1d", "pascal1d"):
        assert pipeline.objective_direction(make_cfg(f"dataset={dataset}")) == "minimize"


# -- study bookkeeping ------------------------------------------------------------------------------

def _sqlite_study(tmp_path, name="s", pruner=None) -> tuple[optuna.Study, str]:
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(storage=study_mod.open_storage(url), study_name=name, direction="maximize",
                                pruner=pruner)
    return study, url


def test_a_finished_trial_records_its_run_directory_in_one_spelling(tmp_path):
    from types import SimpleNamespace

    from hydra.core.utils import JobStatus

    study, _ = _sqlite_study(tmp_path)
    trial = study.ask()
    result = SimpleNamespace(status=JobStatus.COMPLETED, _return_value=0.5, hydra_cfg=OmegaConf.create(
        {"hydra": {"runtime": {"output_dir": f"{tmp_path}/sweep/../sweep/trial_0"}}}))
    tell(study, trial, result)
    (done,) = study.get_trials()
    assert done.value == 0.5 and done.user_attrs[RUN_DIR] == str(tmp_path / "sweep" / "trial_0")


def _interrupt(study: optuna.Study, trial) -> None:
    study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def test_claims_never_exceed_the_budget_and_retry_interrupted_trials_in_their_run_directory(tmp_path):
    study, url = _sqlite_study(tmp_path)
    dists = {"x": optuna.distributions.FloatDistribution(0, 1)}
    sampler_for = lambda k: optuna.samplers.RandomSampler(seed=k)  # noqa: E731
    first = claim_trials(study, url, 3, 2, dists, sampler_for, tmp_path / "sweep")
    assert [t.number for t in first] == [0, 1]
    assert first[0].params != first[1].params  # re-seeded per trial: no repeated draws
    assert first[1].user_attrs[RUN_DIR] == str(tmp_path / "sweep" / "trial_1")
    # One spelling for one directory, as Hydra's output_dir (absolute, `..` resolved), whatever the sweep dir's.
    spelled = claim_trials(study, url, 3, 2, dists, sampler_for, tmp_path / "sweep" / ".." / "sweep")
    assert [t.user_attrs[RUN_DIR] for t in spelled] == [str(tmp_path / "sweep" / "trial_2")]
    assert claim_trials(study, url, 3, 2, dists, sampler_for) == []
    _interrupt(study, first[0])
    (retry,) = claim_trials(study, url, 3, 2, dists, sampler_for, tmp_path / "again")
    assert (retry.number, retry.params, retry.user_attrs[RETRY_OF], retry.user_attrs[RETRIES]) == \
        (3, first[0].params, 0, 1)
    assert retry.user_attrs[RUN_DIR] == str(tmp_path / "sweep" / "trial_0")  # its checkpoint, if any, is there

    _interrupt(study, retry)  # interrupted again: retried again, up to MAX_RETRIES times, then given up
    (second,) = claim_trials(study, url, 3, 2, dists, sampler_for)
    assert (second.params, second.user_attrs[RETRY_OF], second.user_attrs[RETRIES]) == (first[0].params, 3, 2)
    assert study_mod.MAX_RETRIES == 2
    _interrupt(study, second)
    (fresh,) = claim_trials(study, url, 3, 2, dists, sampler_for)
    assert fresh.params != first[0].params and RETRY_OF not in fresh.user_attrs
    _interrupt(study, fresh)  # claimed without a run directory (as by older versions): not retried
    assert RETRY_OF not in claim_trials(study, url, 3, 2, dists, sampler_for)[0].user_attrs


def test_a_retry_resumes_in_place_only_where_that_can_work(tmp_path):
    """place_retry: the interrupted trial's directory with trainer.resume=true when its checkpoint has this
    config and no process holds it; else the same parameters from the start in a directory of its own."""
    study, url = _sqlite_study(tmp_path)
    space = parse_space({}, [*fast(), "simt.eta=interval(0.9,0.99)"])
    compose = lambda overrides: make_cfg(*overrides)  # noqa: E731
    sampler_for = lambda k: optuna.samplers.RandomSampler(seed=k)  # noqa: E731
    runs = tmp_path / "first"

    def retry_of_a_run(checkpoint_config: list[str] | None):
        (trial,) = claim_trials(study, url, 100, 1, space.distributions, sampler_for, runs)
        if checkpoint_config is not None:
            pipeline.run(make_cfg(*fast(*checkpoint_config, f"simt.eta={trial.params['simt.eta']}")),
                         Path(trial.user_attrs[RUN_DIR]))
        _interrupt(study, trial)
        (retry,) = claim_trials(study, url, 100, 1, space.distributions, sampler_for, tmp_path / "second")
        assert retry.params == trial.params
        place_retry(retry, space, compose, tmp_path / "second")
        return trial, retry

    trial, retry = retry_of_a_run([])  # a checkpoint of this very config: resumed in place
    assert retry.user_attrs[RESUME] and retry.user_attrs[RUN_DIR] == trial.user_attrs[RUN_DIR]
    assert trial_overrides(retry, space, url)[-6:-3] == [
        f"hydra.sweep.dir='{runs}'", f"hydra.sweep.subdir=trial_{trial.number}", "trainer.resume=true"]
    fresh = lambda t: (RESUME not in t.user_attrs and  # noqa: E731
                       t.user_attrs[RUN_DIR] == str(tmp_path / "second" / f"trial_{t.number}") and
                       trial_overrides(t, space, url)[-4] == f"hydra.sweep.subdir=trial_{t.number}")
    assert fresh(retry_of_a_run(None)[1])  # the directory is not on this machine
    assert fresh(retry_of_a_run(["simt.lam=0.25"])[1])  # the checkpoint's config differs
    (trial,) = claim_trials(study, url, 100, 1, space.distributions, sampler_for, runs)
    with checkpoint.hold_run_dir(trial.user_attrs[RUN_DIR]):  # a job of the dead sweep still runs there
        _interrupt(study, trial)
        (retry,) = claim_trials(study, url, 100, 1, space.distributions, sampler_for, tmp_path / "second")
        place_retry(retry, space, compose, tmp_path / "second")
        assert fresh(retry)
        with pytest.raises(checkpoint.CheckpointError, match="is in use by another process"):
            pipeline.run(make_cfg(*fast()), Path(trial.user_attrs[RUN_DIR]))


def test_the_retry_check_resolves_the_config_in_the_jobs_environment(tmp_path, monkeypatch):
    """A config may read the environment (${oc.env:...}), and a sweep may set it per job (hydra.job.env_set):
    the check must see the job's value, not the sweep process's, or a resumable run would be restarted."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir

    from simt.sweeping.sweep import _resume_problem
    from_env = "simt.lam='${oc.decode:${oc.env:SIMT_TEST_LAM}}'"
    monkeypatch.setenv("SIMT_TEST_LAM", "0.3")  # the job's environment
    pipeline.run(make_cfg(*fast("simt.eta=0.95", from_env)), tmp_path / "run")
    monkeypatch.setenv("SIMT_TEST_LAM", "0.5")  # the sweep process's

    def with_hydra(overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("config", [*overrides, "+hydra.job.env_set.SIMT_TEST_LAM=0.3"], return_hydra_config=True)

    trial, space = SimpleNamespace(params={"simt.eta": 0.95}), parse_space({}, fast(from_env))
    assert _resume_problem(trial, space, with_hydra, tmp_path / "run") is None
    assert "simt.lam=0.5" in _resume_problem(trial, space, lambda o: make_cfg(*o), tmp_path / "run")


def test_a_retried_grid_cell_counts_as_that_cell(tmp_path):
    study, url = _sqlite_study(tmp_path)
    space = parse_space({}, ["a=choice(1,2)"])
    sampler_for = lambda k: make_sampler("grid", space.distributions)  # noqa: E731
    cells = claim_trials(study, url, 2, 2, space.distributions, sampler_for, tmp_path)
    assert sorted(t.params["a"] for t in cells) == [1, 2]
    _interrupt(study, cells[0])
    record(study, cells[1], 1.0)
    (retry,) = claim_trials(study, url, 2, 2, space.distributions, sampler_for, tmp_path)
    assert retry.params == cells[0].params
    grid_ids = {t.number: t.system_attrs.get("grid_id") for t in study.get_trials()}
    assert grid_ids[retry.number] == grid_ids[cells[0].number] is not None
    record(study, retry, 2.0)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


def test_running_trials_of_dead_sweeps_are_marked_interrupted(tmp_path):
    study, _ = _sqlite_study(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine, gone, remote_stale, remote_alive = (study.ask() for _ in range(4))
    now, host = time.time(), socket.gethostname()
    mine.set_user_attr(OWNER, {"host": host, "pid": os.getppid()})
    gone.set_user_attr(OWNER, {"host": host, "pid": dead.pid})
    remote_stale.set_user_attr(OWNER, {"host": "elsewhere", "pid": 1})
    remote_stale.set_user_attr(HEARTBEAT, now - study_mod.STALE_AFTER_S - 5)
    remote_alive.set_user_attr(OWNER, {"host": "elsewhere", "pid": 1})
    remote_alive.set_user_attr(HEARTBEAT, now)
    assert sorted(fail_interrupted(study)) == [gone.number, remote_stale.number]
    states = {t.number: (t.state, t.user_attrs.get(INTERRUPTED)) for t in study.trials}
    assert states[gone.number] == states[remote_stale.number] == (TrialState.FAIL, True)
    assert states[mine.number][0] == states[remote_alive.number][0] == TrialState.RUNNING


def test_a_trial_reporting_bad_values_is_pruned(tmp_path):
    study, url = _sqlite_study(tmp_path)
    study.set_user_attr(PRUNER_ATTR, {"name": "median", "n_startup_trials": 2})
    for value in (80.0, 90.0):  # two finished trials set the median at each step
        trial = study.ask()
        for step in (10, 20):
            trial.report(value, step)
        study.tell(trial, value)
    good, bad = study.ask(), study.ask()
    TrialReporter(url, "s", good._trial_id)(10, 95.0)  # above the median: goes on
    with pytest.raises(optuna.TrialPruned, match="step 10"):
        TrialReporter(url, "s", bad._trial_id)(10, 20.0)
    assert study.trials[bad.number].intermediate_values == {10: 20.0}


# -- whole sweeps in this process: faults ----------------------------------------------------------

def _sweep_in_process(monkeypatch, tmp_path, task, *args):
    """A Hydra app on the project's config whose job is `task(cfg)`, swept in this process (basic launcher)."""
    import hydra

    @hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
    def app(cfg):
        return task(cfg)

    monkeypatch.setattr(sys, "argv", ["app.py", "-m", "hydra/sweeper=optuna", "hydra.sweeper.sweep=simt_quick",
                                      f"hydra.sweeper.storage=sqlite:///{tmp_path}/s.db",
                                      f"hydra.sweep.dir={tmp_path}/sweep", "hydra.sweeper.sampler=grid",
                                      "hydra.sweeper.study_name=s", *args])
    app()
    return load(f"sqlite:///{tmp_path}/s.db", "s")


def test_raising_and_nan_trials_fail_while_the_sweep_completes(monkeypatch, tmp_path):
    def fake_run(cfg):
        if cfg.simt.lam > 0.7:
            raise RuntimeError("the data vanished")
        return math.nan if cfg.simt.lam < 0.3 else 42.0

    study = _sweep_in_process(monkeypatch, tmp_path, fake_run, "simt.lam=choice(0.1,0.5,0.9)",
                              "simt.eta=0.99", "simt.drop_p=0.0", "hydra.sweeper.n_trials=3")
    by_lam = {t.params["simt.lam"]: t for t in study.trials}
    assert by_lam[0.5].state == TrialState.COMPLETE and by_lam[0.5].value == 42.0
    assert by_lam[0.9].state == TrialState.FAIL and "RuntimeError: the data vanished" in by_lam[0.9].user_attrs["simt:error"]
    assert by_lam[0.1].state == TrialState.FAIL and "not a finite number" in by_lam[0.1].user_attrs["simt:error"]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["trials"]["fail"] == 2 and results["best_value"] == 42.0


def test_a_sweep_with_no_completed_trial_exits_nonzero(monkeypatch, tmp_path):
    def fake_run(cfg):
        raise pipeline.ConfigError("simt.lam", cfg.simt.lam, "something else")

    with pytest.raises(SystemExit) as exit_info:
        _sweep_in_process(monkeypatch, tmp_path, fake_run, "simt.lam=choice(0.1,0.5)", "simt.eta=0.99",
                          "simt.drop_p=0.0")
    assert exit_info.value.code == 1
    assert [t.state for t in load(f"sqlite:///{tmp_path}/s.db", "s").trials] == [TrialState.FAIL] * 2


# -- whole sweeps as users run them ---------------------------------------------------------------

def test_sweep_writes_results_and_resumes_without_duplicates(tmp_path):
    storage = f"sqlite:///{tmp_path}/studies.db"
    done = sweep_cli(tmp_path, "hydra.sweeper.n_trials=3")
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "sweep"
    for name in ("optimization_results.yaml", "trials.csv", "optimization_history.png", "slice.png"):
        assert (sweep / name).stat().st_size > 0, name
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["trials"]["complete"] == 3 and results["command"].startswith("python run.py ")
    assert set(results["best_params"]) == {"simt.eta", "simt.lam", "simt.drop_p"}
    assert sorted(p.name for p in sweep.glob("trial_*")) == ["trial_0", "trial_1", "trial_2"]
    assert all((sweep / f"trial_{i}" / "results.json").is_file() for i in range(3))
    first = {t.number: t.params for t in load(storage).trials}
    listed = subprocess.run([Path(sys.executable).parent / "optuna", "trials", "--study-name", "simt_quick",
                             "--storage", storage, "-f", "yaml"], capture_output=True, text=True)
    assert listed.returncode == 0 and len(yaml.safe_load(listed.stdout)) == 3, listed.stderr

    again = sweep_cli(tmp_path, "hydra.sweeper.n_trials=4")
    assert again.returncode == 0, again.stderr[-3000:]
    trials = load(storage).trials
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.number: t.params for t in trials[:3]} == first
    assert trials[3].params not in first.values()
    with open(sweep / "trials.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4


def test_a_killed_sweep_resumes_with_no_trial_left_running(tmp_path):
    storage = f"sqlite:///{tmp_path}/studies.db"
    args = ["hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=killed"]
    env = child_env()
    slow = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *QUICK, f"hydra.sweeper.storage={storage}",
                             f"hydra.sweep.dir={tmp_path}/first", "trainer.steps=500", *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "first" / "trial_0" / "last.pt").is_file() and time.time() < deadline:
        time.sleep(0.5)  # killed once it has a checkpoint
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    assert [t.state for t in load(storage, "killed").trials] == [TrialState.RUNNING]

    resumed = sweep_cli(tmp_path, *args)  # trainer.steps back to 4: the retry resumes and finishes at once
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = load(storage, "killed").trials
    assert [(t.state, bool(t.user_attrs.get(INTERRUPTED))) for t in trials] == \
        [(TrialState.FAIL, True), (TrialState.COMPLETE, False), (TrialState.COMPLETE, False)]
    assert "1 interrupted" in resumed.stdout + resumed.stderr
    # trial 1 re-ran trial 0's parameters in trial 0's directory, from its checkpoint
    assert trials[1].params == trials[0].params and trials[1].user_attrs[RETRY_OF] == 0
    assert "trial 1 resumes interrupted trial 0" in resumed.stdout + resumed.stderr
    results = json.loads((tmp_path / "first" / "trial_0" / "results.json").read_text())
    assert results["objective"] == trials[1].value and results["steps"] >= 2
    assert trials[1].user_attrs[RUN_DIR] == str(tmp_path / "first" / "trial_0")


def test_pruned_trials_stop_training_early(tmp_path):
    done = sweep_cli(tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweeper.pruner={name: threshold, lower: 101}",
                     "trainer.steps=6", "hydra.sweeper.study_name=pruned")
    assert done.returncode == 1  # nothing completed
    (trial,) = load(f"sqlite:///{tmp_path}/studies.db", "pruned").trials
    assert trial.state == TrialState.PRUNED and trial.last_step == 2 and trial.value is not None
    assert not (tmp_path / "sweep" / "trial_0" / "results.json").exists()


def test_joblib_launcher_runs_trials_in_parallel(tmp_path):
    done = sweep_cli(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=2")
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = load(f"sqlite:///{tmp_path}/studies.db").trials
    assert first.state == second.state == TrialState.COMPLETE
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete


def test_plain_multiruns_still_use_hydras_basic_sweeper(tmp_path):
    done = run_cli("-m", "dataset=synthetic", "trainer=smoke", "trainer.steps=2", "trainer.eval_every=2",
                   "backbone.hidden=8", "trainer.threads=1", "simt.enabled=true,false", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "optimization_results.yaml").exists()


# -- several sweep processes on one study ------------------------------------------------------------

def _cooperating_sweeps(tmp_path, storage: str, n_trials: int = 4) -> list[optuna.trial.FrozenTrial]:
    env = child_env()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "run.py"), *QUICK, f"hydra.sweeper.storage={storage}",
                               f"hydra.sweep.dir={tmp_path}/p{i}", f"hydra.sweeper.n_trials={n_trials}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("trial " in out for out in outputs), "both processes should have run trials"
    return load(storage).trials


def test_two_processes_share_a_journal_file(tmp_path):
    trials = _cooperating_sweeps(tmp_path, f"journal:{tmp_path}/study.log")
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on loopback (Debian's postgresql package; .ci/run installs it)."""
    bins = sorted(glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not bins[-1]:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's postgresql package")
    bindir = Path(bins[-1]).parent
    data = Path(tempfile.mkdtemp(prefix="simt-pg-", dir="/tmp"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, bindir / "initdb", "-D", data / "db", "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, bindir / "pg_ctl", "-D", data / "db", "-w", "-l", data / "log", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, bindir / "pg_ctl", "-D", data / "db", "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(data, ignore_errors=True)


def test_two_processes_share_a_postgresql_study(tmp_path, postgres_url):
    trials = _cooperating_sweeps(tmp_path, postgres_url)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
