import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
# Small, fast settings shared by tests that build whole experiments (tiny ops are overhead-bound on
# CPU, so fewer inner steps is what makes them fast), with the paper's SiMT values (simt=paper).
FAST = ["simt=paper", "dataset=synthetic", "trainer=smoke", "backbone.hidden=8", "trainer.threads=1", "task.meta_batch_size=2",
        "task.queries=5"]
FEW_STEPS = ["algo.inner_steps=1", "algo.eval_inner_steps=2", "algo.inner_lr=0.4"]


def fast(*overrides: str) -> list[str]:
    """FAST plus fewer inner steps for gradient-based learners (ProtoNet has no inner loop)."""
    protonet = any(o == "algo=protonet" for o in overrides)
    base = [o for o in FAST if not (o.startswith("backbone.hidden") and "backbone=resnet12" in overrides)]
    return [*base, *([] if protonet else FEW_STEPS), *overrides]


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)  # tests compare runs bitwise and must not fight over the two cores


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: ROOT first on PYTHONPATH, then whatever the caller's path holds
    (e.g. a GPU machine's dependencies installed outside site-packages)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_cli(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in a subprocess (the way users call it)."""
    env = child_env()
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True, **popen)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are skipped, not failed, where there is no CUDA device (e.g. `pytest -m gpu` on a laptop)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
