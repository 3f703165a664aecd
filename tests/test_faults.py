"""Faults around checkpoints and stopping: a foreign or damaged file, a full disk, a checkpoint of another run,
Ctrl-C. Each ends in one line naming the file (or a saved checkpoint), never a traceback."""
import errno
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from simt import checkpoint, pipeline
from simt.checkpoint import CheckpointError
from simt.trainer import Trainer
from tests.conftest import fast, make_cfg
from tests.test_trainer import _start, _wait_for

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "weights_only" not in message, message
    return message


# -- load: foreign and damaged files ------------------------------------------------------------------

def _torn(path: Path) -> None:
    torch.save({"step": 1, "weights": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])


@pytest.mark.parametrize("write, kind", [
    (lambda path: path.write_bytes(b"not a checkpoint"), "UnpicklingError"),  # torch's text: re-run with weights_only
    (lambda path: path.write_bytes(b""), "EOFError"),
    (_torn, "RuntimeError"),
], ids=["garbage", "empty", "torn"])
def test_an_unreadable_checkpoint_is_one_line_of_our_own(write, kind, tmp_path):
    path = tmp_path / "last.pt"
    write(path)
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path)
    assert _one_line(error) == (f"checkpoint {path}: unreadable (not a checkpoint written by this tool, or damaged: "
                                f"{kind})")


RAN = []


def _record(what: str) -> None:
    RAN.append(what)


class _Calls:
    """Unpickling it calls `function`: what a crafted checkpoint does to run code."""

    def __init__(self, function):
        self.function = function

    def __reduce__(self):
        return self.function, ("loaded",)


@pytest.mark.parametrize("functions, named", [
    ([_record], f"{__name__}._record"),
    ([_record, print, len, repr], "builtins.len, builtins.print, builtins.repr, ..."),
], ids=["one", "many"])
def test_a_checkpoint_holding_other_objects_is_refused_without_running_them(functions, named, tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"step": 1, "learner": [_Calls(function) for function in functions]}, path)
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path)
    assert _one_line(error) == (f"checkpoint {path}: refused, it holds objects other than tensors and plain "
                                f"containers ({named}), and loading it could run code")
    assert RAN == []


def test_a_checkpoint_that_is_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "best.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path)
    assert _one_line(error) == (f"checkpoint {path}: unreadable (not a checkpoint written by this tool: it holds a "
                                f"Tensor, not a dict)")


def test_a_checkpoint_the_user_may_not_read_says_so(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    torch.save({"step": 1}, path)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path)
    assert _one_line(error) == f"checkpoint {path}: could not be read (Permission denied)"


# -- save_atomic: a full disk -------------------------------------------------------------------------

def _raise(error: BaseException):
    def fail(*args, **kwargs):
        raise error
    return fail


def _writer_fails(payload, handle):
    """What torch.save does when a write under it fails: a RuntimeError raised while handling the OSError."""
    try:
        raise ENOSPC
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("target, replacement, reason", [
    (torch, ("save", _raise(ENOSPC)), "No space left on device"),
    (torch, ("save", _writer_fails), "No space left on device"),
    (os, ("fsync", _raise(ENOSPC)), "No space left on device"),
    (torch, ("save", _raise(RuntimeError("writer failed\nmore detail"))), "RuntimeError: writer failed"),
], ids=["save-oserror", "save-runtimeerror", "fsync", "other-runtimeerror"])
def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(target, replacement, reason,
                                                                               tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1}, path)
    monkeypatch.setattr(target, *replacement)
    with pytest.raises(CheckpointError) as error:
        checkpoint.save_atomic({"step": 2}, path)
    assert _one_line(error) == f"checkpoint {path}: could not be written ({reason}); the previous file is kept"
    monkeypatch.undo()
    assert checkpoint.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    monkeypatch.setattr(torch, "save", _raise(ENOSPC))
    with pytest.raises(CheckpointError) as error:
        checkpoint.save_atomic({"step": 1}, path)
    assert _one_line(error) == f"checkpoint {path}: could not be written (No space left on device)"
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_is_not_reported_as_a_checkpoint_error(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1}, path)
    monkeypatch.setattr(torch, "save", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# -- restoring: a readable checkpoint of another run --------------------------------------------------

def _trainer(run_dir: Path, *overrides: str, steps: int = 4, score_validation=None) -> Trainer:
    cfg = make_cfg(*fast(*overrides))
    exp = pipeline.build(cfg)
    sampler = exp.dataset.split("train").sampler(5, cfg.task.shots, cfg.task.queries, seed=cfg.seed)
    optimizer = torch.optim.Adam(exp.learner.meta_parameters().values(), lr=1e-3)
    score_validation = score_validation or (lambda step: {"student": 0.0, "target": 0.0})
    return Trainer(exp.learner, exp.target, optimizer, sampler, score_validation, run_dir, steps=steps,
                   meta_batch_size=cfg.task.meta_batch_size, eval_every=2, checkpoint_every=100,
                   device=torch.device("cpu"))


def test_resuming_a_checkpoint_of_another_backbone_size_is_one_line(tmp_path):
    _trainer(tmp_path, "backbone.hidden=8").save()
    path = tmp_path / checkpoint.LAST
    other = _trainer(tmp_path, "backbone.hidden=16")
    with pytest.raises(CheckpointError) as error, checkpoint.restoring(path):
        other.resume(checkpoint.load(path))
    message = _one_line(error)
    assert message.startswith(f"checkpoint {path}: does not fit this run (RuntimeError: Error(s) in loading "
                              f"state_dict for ")
    assert ": size mismatch for " in message and "torch.Size([16" in message


def test_resuming_a_checkpoint_without_an_optimizer_names_the_key(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.save()
    path = tmp_path / checkpoint.LAST
    payload = checkpoint.load(path)
    del payload["optimizer"]
    with pytest.raises(CheckpointError) as error, checkpoint.restoring(path):
        trainer.resume(payload)
    assert _one_line(error) == f"checkpoint {path}: does not fit this run (missing key 'optimizer')"


@pytest.mark.parametrize("raised, detail", [
    (KeyError("learner"), "missing key 'learner'"),
    (ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group"),
     "ValueError: loaded state dict contains a parameter group that doesn't match the size of optimizer's group"),
    (TypeError("'NoneType' object is not subscriptable"), "TypeError: 'NoneType' object is not subscriptable"),
    (RuntimeError("The size of tensor a (16) must match the size of tensor b (8)\nat dimension 0"),
     "RuntimeError: The size of tensor a (16) must match the size of tensor b (8)"),
])
def test_restoring_turns_what_does_not_fit_into_one_line(raised, detail, tmp_path):
    with pytest.raises(CheckpointError) as error, checkpoint.restoring(tmp_path / "best.pt"):
        raise raised
    assert _one_line(error) == f"checkpoint {tmp_path / 'best.pt'}: does not fit this run ({detail})"


@pytest.mark.parametrize("raised", [CheckpointError("checkpoint x: no such file"),
                                    torch.cuda.OutOfMemoryError("CUDA out of memory"), ZeroDivisionError()])
def test_restoring_passes_on_what_is_not_the_checkpoints_misfit(raised, tmp_path):
    with pytest.raises(type(raised)) as error, checkpoint.restoring(tmp_path / "best.pt"):
        raise raised
    assert error.value is raised


# -- Ctrl-C --------------------------------------------------------------------------------------------

def test_ctrl_c_in_training_saves_a_checkpoint_exits_130_and_restores_the_handler(tmp_path):
    def ctrl_c_at_step_2(step):
        if step == 2:
            signal.raise_signal(signal.SIGINT)
        return {"student": 0.0, "target": 0.0}

    trainer = _trainer(tmp_path, steps=6, score_validation=ctrl_c_at_step_2)
    calls = []

    def ours(*args):  # stands for the handler before training (pytest's would end the test session)
        calls.append(args)

    previous = signal.signal(signal.SIGINT, ours)
    try:
        with pytest.raises(SystemExit) as exit:
            trainer.fit()
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert exit.value.code == 128 + signal.SIGINT and restored is ours and calls == []
    assert checkpoint.load(tmp_path / checkpoint.LAST)["step"] == 3  # the step under way when the signal came


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["preemption", "ctrl-c"])
def test_a_stop_signal_on_the_command_line_saves_a_checkpoint_and_exits(signum, tmp_path):
    run = _start(tmp_path, *fast("trainer.steps=100000", "trainer.checkpoint_every=100000",
                                 "trainer.eval_every=100000"))
    log_file = tmp_path / "run.log"
    _wait_for(lambda: log_file.exists() and "training" in log_file.read_text(), run)
    time.sleep(0.5)
    run.send_signal(signum)
    assert run.wait(timeout=60) == 128 + signum  # 143, 130
    assert "Traceback" not in run.stderr.read()
    assert 0 < checkpoint.load(tmp_path / "last.pt")["step"] < 100000


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    exp = pipeline.build(make_cfg(*fast()))
    trainer = Trainer(exp.learner, exp.target, torch.optim.Adam(exp.learner.meta_parameters().values()), None,
                      lambda step: {}, tmp_path, steps=1, meta_batch_size=1, eval_every=1, checkpoint_every=1,
                      device=exp.device)
    previous = signal.getsignal(signal.SIGINT)
    try:
        trainer._request_stop(signal.SIGINT, None)  # the first: finish the step, save, exit 130
        assert trainer._stop_signal == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the second raises KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, previous)
