"""End to end: short runs, results.json, checkpoints, exact resume, preemption, failures, mode=eval."""
import json
import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from simt import checkpoint, pipeline, trainer
from tests.conftest import FAST, ROOT, fast, make_cfg, run_cli

ALGOS = ["maml", "fomaml", "anil", "metasgd", "protonet"]


def _results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def _assert_same_weights(a: Path, b: Path) -> None:
    left, right = checkpoint.load(a), checkpoint.load(b)
    assert left["step"] == right["step"]
    for part in ("learner", "target", "optimizer", "sampler", "rng"):
        if part not in left and part not in right:  # best.pt holds weights only
            continue
        flat_l, flat_r = _flatten(left[part]), _flatten(right[part])
        assert flat_l.keys() == flat_r.keys()
        for key in flat_l:
            assert torch.equal(flat_l[key], flat_r[key]), f"{part}:{key} differs"


def _flatten(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}{i}/").items()}
    return {prefix: tree} if isinstance(tree, torch.Tensor) else {prefix: torch.tensor(float(tree or 0))}


def _same_metrics(a: dict, b: dict) -> None:
    for key in ("test/acc", "test/acc_ci95", "test/student/acc", "val/best", "val/best_step", "val/history",
                "test_episodes"):
        assert a.get(key) == b.get(key), key


@pytest.mark.parametrize("simt", [True, False])
@pytest.mark.parametrize("algo", ALGOS)
def test_short_run_writes_results_and_checkpoints(algo, simt, tmp_path):
    cfg = make_cfg(*fast(f"algo={algo}", f"simt.enabled={simt}", "simt.drop_p=0.1"))
    objective = pipeline.run(cfg, tmp_path)
    results = _results(tmp_path)
    assert math.isfinite(objective) and objective == results["val/best"]
    assert results["reported_model"] == ("target" if simt else "student")
    for key in ("test/acc", "test/acc_ci95", "test/student/acc", "test/student/acc_ci95", "wall_time_s"):
        assert math.isfinite(results[key]), key
    assert ("test/target/acc" in results) == simt
    assert len(results["test_episodes"]["student"]) == cfg.trainer.eval_tasks
    assert results["config"]["algo"]["_target_"] == cfg.algo._target_
    assert {"last.pt", "best.pt"} <= {p.name for p in tmp_path.iterdir()}
    assert any((tmp_path / "tb").iterdir())


def test_training_beats_chance(tmp_path):
    # η=0.9 so the target catches up within 30 steps (at 0.995 it would still be near initialisation).
    cfg = make_cfg(*fast("trainer.steps=30", "trainer.eval_every=10", "trainer.eval_tasks=40", "simt.eta=0.9"))
    pipeline.run(cfg, tmp_path)
    results = _results(tmp_path)
    assert results["test/student/acc"] > 40.0 and results["test/target/acc"] > 40.0  # 5-way chance: 20%


def test_extending_a_finished_run_equals_an_uninterrupted_run(tmp_path):
    common = fast("algo=metasgd", "trainer.eval_every=5", "trainer.checkpoint_every=5", "simt.drop_p=0.2")
    pipeline.run(make_cfg(*common, "trainer.steps=20"), tmp_path / "full")
    pipeline.run(make_cfg(*common, "trainer.steps=12"), tmp_path / "split")  # not a multiple of eval_every
    pipeline.run(make_cfg(*common, "trainer.steps=20", "trainer.resume=true"), tmp_path / "split")
    _assert_same_weights(tmp_path / "full" / "last.pt", tmp_path / "split" / "last.pt")
    _assert_same_weights(tmp_path / "full" / "best.pt", tmp_path / "split" / "best.pt")
    _same_metrics(_results(tmp_path / "full"), _results(tmp_path / "split"))


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={run_dir}", *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, f"run ended early: {process.stderr.read()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    # With the EMA warm-up: its momentum depends on the step, which the resumed run must continue exactly.
    args = fast("trainer.steps=40", "trainer.eval_every=20", "trainer.checkpoint_every=5", "simt.drop_p=0.2",
                "simt.eta_schedule=warmup")
    assert run_cli(f"hydra.run.dir={tmp_path / 'full'}", *args).returncode == 0
    killed = _start(tmp_path / "killed", *args)
    _wait_for(lambda: (tmp_path / "killed" / "last.pt").exists(), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    interrupted_at = checkpoint.load(tmp_path / "killed" / "last.pt")["step"]
    assert 0 < interrupted_at < 40
    resumed = run_cli(f"hydra.run.dir={tmp_path / 'killed'}", *args, "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_weights(tmp_path / "full" / "last.pt", tmp_path / "killed" / "last.pt")
    _assert_same_weights(tmp_path / "full" / "best.pt", tmp_path / "killed" / "best.pt")
    _same_metrics(_results(tmp_path / "full"), _results(tmp_path / "killed"))
    assert _logged_steps(tmp_path / "killed") == list(range(1, 41))  # no step logged twice


def _logged_steps(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return sorted(event.step for event in events.Scalars("train/loss"))


def test_best_checkpoint_is_chosen_by_the_target_when_simt_is_on(tmp_path):
    pipeline.run(make_cfg(*fast("trainer.steps=8", "simt.eta=0.5")), tmp_path)
    history = _results(tmp_path)["val/history"]
    best = max((entry for entry in history if entry["selects"]), key=lambda entry: entry["target"])
    assert checkpoint.load(tmp_path / "best.pt")["step"] == best["step"]
    assert _results(tmp_path)["val/best"] == best["target"]


def test_resume_refuses_a_different_config(tmp_path):
    pipeline.run(make_cfg(*fast()), tmp_path)
    with pytest.raises(pipeline.ConfigError, match="simt.enabled=False: expected True as in the checkpoint"):
        pipeline.run(make_cfg(*fast("trainer.resume=true", "simt.enabled=false")), tmp_path)


def test_resume_keeps_validating_on_the_checkpoints_number_of_episodes(tmp_path, caplog):
    """val_tasks follows a smaller eval_tasks unless set, and a resume may change eval_tasks: the resumed
    run still validates on the episodes it chose its best model by (and says so)."""
    pipeline.run(make_cfg(*fast("trainer.steps=2", "trainer.val_tasks=4")), tmp_path)
    pipeline.run(make_cfg(*fast("trainer.steps=4", "trainer.val_tasks=3", "trainer.resume=true")), tmp_path)
    assert _results(tmp_path)["config"]["trainer"]["val_tasks"] == 4 and _results(tmp_path)["steps"] == 4
    assert "trainer.val_tasks=3: the run being resumed validates on 4 episodes" in caplog.text
    written = (tmp_path / "results.json").stat().st_mtime_ns
    caplog.clear()  # the same command again: the finished run is recognised, its validation count kept
    caplog.set_level(logging.INFO, logger=pipeline.log.name)
    pipeline.run(make_cfg(*fast("trainer.steps=4", "trainer.val_tasks=3", "trainer.resume=true")), tmp_path)
    assert "already finished with this config" in caplog.text
    assert (tmp_path / "results.json").stat().st_mtime_ns == written


def test_tasks_per_backward_reaches_every_training_step(tmp_path, monkeypatch):
    real, seen = trainer.meta_batch_backward, []
    monkeypatch.setattr(trainer, "meta_batch_backward",
                        lambda *args, **kwargs: seen.append(kwargs["tasks_per_backward"]) or real(*args, **kwargs))
    pipeline.run(make_cfg(*fast("algo.engine=batched", "trainer.tasks_per_backward=1")), tmp_path)
    assert seen == [1] * make_cfg(*fast()).trainer.steps


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real, calls = trainer.meta_batch_backward, []

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), stats

    monkeypatch.setattr(trainer, "meta_batch_backward", poisoned)
    with pytest.raises(trainer.NonFiniteError, match="non-finite outer loss .* at step 3; stopped, last checkpoint kept at step 2"):
        pipeline.run(make_cfg(*fast("trainer.checkpoint_every=2", "trainer.steps=6")), tmp_path)
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 2
    assert checkpoint.load(tmp_path / "best.pt")["step"] == 2


def test_non_finite_parameters_stop_before_they_are_checkpointed(tmp_path, monkeypatch):
    real, steps = torch.optim.Adam.step, []

    def poisoned(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 3:  # one element of one parameter: the check must see every element
            with torch.no_grad():
                self.param_groups[0]["params"][-1].view(-1)[-1] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    with pytest.raises(trainer.NonFiniteError, match="non-finite parameters after the optimizer step at step 3; "
                                                     "stopped, last checkpoint kept at step 2"):
        pipeline.run(make_cfg(*fast("trainer.checkpoint_every=2", "trainer.steps=6")), tmp_path)
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_element_among_many_tensors(bad):
    tensors = [torch.randn(3, 4), torch.full((5,), 3e38), torch.randn(2)]
    assert trainer._all_finite(tensors)
    tensors[1][2] = bad
    assert not trainer._all_finite(tensors)
    assert trainer._all_finite([torch.empty(0), torch.ones(2)]) and trainer._all_finite([])


def test_mode_eval_reproduces_the_test_score(tmp_path):
    pipeline.run(make_cfg(*fast()), tmp_path / "run")
    score = pipeline.run(make_cfg(*fast("mode=eval", f"checkpoint={tmp_path / 'run'}")), tmp_path / "eval")
    assert score == _results(tmp_path / "run")["test/acc"]
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["test/acc"] == score


def test_mode_eval_without_a_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(pipeline.ConfigError, match="checkpoint="):
        pipeline.run(make_cfg(*FAST, "mode=eval", f"checkpoint={tmp_path / 'missing'}"), tmp_path)


def test_a_torn_checkpoint_is_reported_with_its_path(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path / 'last.pt'}: unreadable"):
        checkpoint.load(tmp_path / "last.pt")


def test_validation_hook_sees_every_validation_and_can_stop_the_run(monkeypatch, tmp_path):
    seen = []

    class Stop(Exception):
        pass

    def hook(step, value):
        seen.append((step, value))
        if step == 2:
            raise Stop  # what a pruned Optuna trial does

    monkeypatch.setattr(pipeline, "trial_reporter", lambda: hook)
    with pytest.raises(Stop):
        pipeline.run(make_cfg(*fast("trainer.steps=6")), tmp_path)
    assert [step for step, _ in seen] == [2] and math.isfinite(seen[0][1])
    assert not (tmp_path / "results.json").exists()


def test_a_finished_run_is_skipped_only_when_its_config_is_unchanged(tmp_path):
    cfg = make_cfg(*fast(), "trainer.resume=true")
    pipeline.run(cfg, tmp_path)
    results = tmp_path / "results.json"
    written = results.stat().st_mtime_ns
    assert pipeline.run(make_cfg(*fast(), "trainer.resume=true", "trainer.threads=2"), tmp_path) == \
        _results(tmp_path)["objective"]
    assert results.stat().st_mtime_ns == written  # mechanics (threads) are not part of the config hash
    pipeline.run(make_cfg(*fast(), "trainer.resume=true", "trainer.steps=6"), tmp_path)  # longer: extends the run
    assert results.stat().st_mtime_ns != written and _results(tmp_path)["steps"] == 6


def _hash_before_2026_11_27(resolved: dict) -> str:
    """config_hash as versions before 2026-11-27 computed it (written out again here, not the code under
    test): data_dir left out, the data sets' roots in."""
    import hashlib

    def flat(tree, prefix=""):
        return {k: v for key, value in tree.items()
                for k, v in (flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                             else {f"{prefix}{key}": value}).items()}

    kept = {key: value for key, value in flat(resolved).items() if key not in pipeline.MECHANICS | {"data_dir"}
            and not (key in pipeline.LATER_KEYS and value == pipeline.LATER_KEYS[key])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_moved_data_resumes_and_finished_runs_are_recognised_wherever_the_data_is(tmp_path):
    """data_dir and the data sets' roots say where the files are, not what is computed: a resume reads the
    data from its new place, and a finished run's hash (also as older versions wrote it) still matches."""
    from tests import fixtures_images

    first = fixtures_images.write_all(tmp_path / "data")
    args = ("dataset=miniimagenet", "eval_dataset=cub", "trainer.checkpoint_every=1")
    pipeline.run(make_cfg(*fast(*args, f"data_dir={first}", "trainer.steps=2")), tmp_path / "run")
    moved = first.rename(tmp_path / "moved")
    pipeline.run(make_cfg(*fast(*args, f"data_dir={moved}", "trainer.steps=3", "trainer.resume=true")),
                 tmp_path / "run")
    results = _results(tmp_path / "run")
    assert results["steps"] == 3 and results["config"]["dataset"]["root"] == f"{moved}/miniimagenet"

    resolved = OmegaConf.to_container(make_cfg(*fast(*args, "data_dir=/elsewhere", "trainer.steps=3")), resolve=True)
    assert results["config_hash"] == pipeline.config_hash(resolved)
    legacy = _hash_before_2026_11_27(results["config"])
    assert legacy != results["config_hash"] and legacy in pipeline.config_hashes(results["config"])
    assert legacy not in pipeline.config_hashes(resolved)  # the old fingerprint names the old place
    # mode=eval on a run whose checkpoints name an old place: the saved roots that are gone follow data_dir.
    third = moved.rename(tmp_path / "third")
    score = pipeline.run(make_cfg(*fast("mode=eval", f"checkpoint={tmp_path / 'run'}", f"data_dir={third}")),
                         tmp_path / "eval")
    assert math.isfinite(score)
    with pytest.raises(pipeline.ConfigError, match="dataset.name='tieredimagenet': expected 'miniimagenet'"):
        pipeline.run(make_cfg(*fast("dataset=tieredimagenet", "eval_dataset=cub", f"data_dir={third}",
                                    "trainer.steps=4", "trainer.resume=true")), tmp_path / "run")
