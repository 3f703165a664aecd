"""Every single-run command in the README composes, resolves and passes the config checks as written
(multirun and sweep lines are covered by the sweep tests; lines shown with `$` are the README's examples of
errors)."""
import re
import shlex
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from simt import pipeline
from tests.conftest import ROOT, child_env, make_cfg

COMMAND = re.compile(r"^(?:\.venv/bin/)?python run\.py\b(.*?)(?:\s+#.*)?$")


def readme_commands() -> list[str]:
    """The arguments of each `python run.py ...` line inside the README's code blocks, multiruns left out."""
    commands, in_block = [], False
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")  # continued lines as one
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        match = COMMAND.match(line.strip()) if in_block else None
        if match and "-m" not in shlex.split(match.group(1)):
            commands.append(match.group(1).strip())
    return commands


def test_the_readme_shows_single_run_commands():
    commands = readme_commands()
    assert len(commands) >= 8 and "algo=maml simt.eta=0.995" in commands


@pytest.mark.parametrize("arguments", readme_commands())
def test_a_readme_command_composes_resolves_and_passes_the_checks(arguments, tmp_path):
    cfg = make_cfg(*(o.replace("RUN_DIR", str(tmp_path)) for o in shlex.split(arguments)))
    pipeline.check_config(cfg)
    assert OmegaConf.to_container(cfg, resolve=True)["algo"]["_target_"]


def readme_errors() -> list[tuple[str, str]]:
    """(arguments, the error line the README shows) for each `$ python run.py ...` example."""
    lines = (ROOT / "README.md").read_text().splitlines()
    return [(line.removeprefix("$ python run.py").strip(), following.strip())
            for line, following in zip(lines, lines[1:])
            if line.startswith("$ python run.py") and following.startswith("error: ")]


def test_the_readmes_error_examples_are_what_the_command_prints(tmp_path):
    examples = readme_errors()
    assert len(examples) >= 4
    runs = [subprocess.Popen([sys.executable, str(ROOT / "run.py"), *shlex.split(arguments),
                              f"hydra.run.dir={tmp_path / str(k)}", f"hydra.sweep.dir={tmp_path / str(k)}"],
                             cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k, (arguments, _) in enumerate(examples)]  # all at once: a few seconds in all
    for run, (arguments, error) in zip(runs, examples):
        _, stderr = run.communicate(timeout=300)
        assert run.returncode != 0 and error in stderr.splitlines(), (arguments, stderr[-2000:])
