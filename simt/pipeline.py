"""The one construction site: validate the composed config, build every object from it, run.

Nothing else in the package reads the config; everything else takes plain objects and numbers.
"""
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from simt import allocator, checkpoint, distributed
from simt.algorithms.engines import ENGINES
from simt.algorithms.maml import ADAPT_SCOPES
from simt.algorithms.metasgd import LR_SHAPES
from simt.checkpoint import CheckpointError
from simt.data.safe_pickle import DataError
from simt.data import FewShotDataset
from simt.evaluator import evaluate, summarize
from simt.momentum import ETA_SCHEDULES, MomentumTarget
from simt.sweeping import trial_reporter
from simt.trainer import NonFiniteError, Trainer

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("algo", "backbone", "dataset", "simt", "trainer", "compat", "eval_dataset", "experiment")


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key, the value and what was expected."""

    def __init__(self, key: str, value, expected: str):
        super().__init__(f"{key}={value!r}: expected {expected}")


# -- validation ------------------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # parameters and losses are float32: a larger number is inf there
SEED_MAX = 2**63 - 1  # torch and numpy seeds are 64-bit
CORES = os.cpu_count() or 1


def _int_in(low: int, high: int, why: str = ""):
    """(check, expected) for an integer in low..high; `why` says what a larger value would cost."""
    return (lambda v: _is_int(v) and low <= v <= high,
            f"an integer in {low}..{high:,}" + (f" ({why})" if why else ""))


# A step size or temperature: positive, and finite once it is a float32 parameter's factor.
POSITIVE_FLOAT32 = (lambda v: _is_number(v) and 0 < v <= FLOAT32_MAX,
                    f"a number in (0, {FLOAT32_MAX:.4g}] (finite in float32)")
EPISODE_COUNT = _int_in(2, 10**6, "a million episodes take hours on a GPU")  # two at least: a CI needs two


def _in_unit_interval(v) -> bool:
    return _is_number(v) and 0 <= v <= 1


# key -> (check, what was expected). Keys absent from the config (e.g. inner_lr for ProtoNet) are skipped.
# Upper bounds keep a typo from asking for terabytes or years: each names what a larger value would cost.
RULES = {
    "seed": _int_in(0, SEED_MAX),
    "data_dir": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty folder path"),
    "mode": (lambda v: v in ("train", "eval"), "one of train, eval"),
    "simt.enabled": (lambda v: isinstance(v, bool), "true or false"),
    "simt.eta": (_in_unit_interval, "a number in [0, 1]"),
    "simt.eta_schedule": (lambda v: v in ETA_SCHEDULES, f"one of {', '.join(ETA_SCHEDULES)}"),
    "simt.lam": (_in_unit_interval, "a number in [0, 1]"),
    "simt.drop_p": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "simt.temp": POSITIVE_FLOAT32,
    "task.ways": _int_in(2, 10_000),
    "task.shots": _int_in(1, 10_000),
    "task.queries": _int_in(1, 10_000),
    "task.meta_batch_size": _int_in(1, 1024, "1,024 tasks of 5 ways x 16 images at 84x84x3 are 6.9 GB of "
                                             "images alone"),
    "task.min_shots": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    "algo.inner_lr": POSITIVE_FLOAT32,
    "algo.inner_steps": _int_in(0, 1000, "a second-order step keeps its activations in memory"),
    "algo.eval_inner_steps": _int_in(0, 1000),
    "algo.train_ways": (lambda v: v is None or (_is_int(v) and 2 <= v <= 10_000), "null or an integer in 2..10,000"),
    "algo.first_order": (lambda v: isinstance(v, bool), "true or false"),
    "algo.adapt_scope": (lambda v: v in ADAPT_SCOPES, f"one of {', '.join(ADAPT_SCOPES)}"),
    "algo.lr_shape": (lambda v: v in LR_SHAPES, f"one of {', '.join(LR_SHAPES)}"),
    "algo.engine": (lambda v: v in ENGINES, f"one of {', '.join(ENGINES)}"),
    "dataset.seed": _int_in(0, SEED_MAX),
    "dataset.instances": _int_in(2, 10_000),
    "dataset.image_size": _int_in(16, 1024, "Conv4 max-pools 4 times; a 1024x1024 image's first activations "
                                            "take 268 MB at 64 channels"),
    "backbone.hidden": _int_in(1, 4096, "a 4096-channel 3x3 convolution holds 604 MB of weights"),
    "trainer.steps": _int_in(1, 10**9),
    "trainer.lr": POSITIVE_FLOAT32,
    "trainer.eval_every": _int_in(1, 10**9),
    "trainer.checkpoint_every": _int_in(1, 10**9),
    "trainer.eval_tasks": EPISODE_COUNT,  # first: the default val_tasks is computed from it
    "trainer.val_tasks": EPISODE_COUNT,
    "trainer.episode_seed": _int_in(0, SEED_MAX),
    "trainer.resume": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.device": (lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or v.startswith("cuda:")),
                       "auto, cpu, cuda or cuda:N"),
    "trainer.threads": (lambda v: v is None or (_is_int(v) and 1 <= v <= CORES),
                        f"null or an integer in 1..{CORES} (the cores of this machine)"),
    "trainer.progress": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
    "trainer.precision": (lambda v: v in ("fp32", "bf16"), "fp32 or bf16"),
    "trainer.eval_batch": (lambda v: v == "auto" or (_is_int(v) and 1 <= v <= 4096), "auto or an integer in 1..4,096"),
    "trainer.tasks_per_backward": (lambda v: v is None or (_is_int(v) and 1 <= v <= 1024),
                                   "null or an integer in 1..1,024"),
    "trainer.data_on_device": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
    "trainer.keep_freed_memory": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
}


def check_config(cfg: DictConfig) -> None:
    """Check every value before any work starts; raise ConfigError on the first bad one."""
    for key, (ok, expected) in RULES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value != "<absent>" and not ok(value):
            raise ConfigError(key, value, expected)
    if cfg.task.get("min_shots") is not None and cfg.task.min_shots > cfg.task.shots:
        raise ConfigError("task.min_shots", cfg.task.min_shots, f"null or at most task.shots={cfg.task.shots}")
    if distributed.world_size() > cfg.task.meta_batch_size:
        raise ConfigError("task.meta_batch_size", cfg.task.meta_batch_size,
                          f"at least {distributed.world_size()} (one task or more per torchrun process)")
    if cfg.mode == "eval" and not cfg.checkpoint:
        raise ConfigError("checkpoint", cfg.checkpoint, "a run directory or checkpoint file when mode=eval")
    if not get_class(cfg.algo._target_).embedding_model and train_ways(cfg) != cfg.task.ways:
        raise ConfigError("algo.train_ways", train_ways(cfg),
                          f"null or task.ways={cfg.task.ways} (the linear head has one output per way)")
    # Embedded data sets declare their size, so task shapes are checked before anything is built.
    if "split_classes" in cfg.dataset:
        for split, classes in cfg.dataset.split_classes.items():
            if not _is_int(classes) or not 1 <= classes <= 100_000:
                raise ConfigError(f"dataset.split_classes.{split}", classes, "an integer in 1..100,000")
        per_class = cfg.dataset.get("instances") or cfg.dataset.get("samples_per_object")
        _check_task_fits(cfg, dict(cfg.dataset.split_classes), per_class, cfg.dataset._target_.split(".")[-2],
                         regression="samples_per_object" in cfg.dataset)


def objective_direction(cfg: DictConfig) -> str:
    """What a sweep does with run()'s objective: regression errors are minimised, accuracies maximised.
    Known from the config alone, so a study can be created before its first trial."""
    regression = cfg.dataset._target_.startswith("simt.data.regression.")
    return "minimize" if regression else "maximize"


def train_ways(cfg: DictConfig) -> int:
    """Ways of training episodes: algo.train_ways (ProtoNet: 20) or task.ways."""
    return cfg.algo.get("train_ways") or cfg.task.ways


def _check_task_fits(cfg: DictConfig, split_classes: dict[str, int], instances: int, dataset: str,
                     regression: bool = False) -> None:
    for split, classes in split_classes.items():
        if regression:  # one object per task: ways do not apply
            break
        ways, key = (train_ways(cfg), "algo.train_ways" if cfg.algo.get("train_ways") else "task.ways") \
            if split == "train" else (cfg.task.ways, "task.ways")
        if ways > classes:
            raise ConfigError(key, ways, f"at most {classes} (classes in the {split} split of "
                                         f"dataset {dataset})")
    if cfg.task.shots + cfg.task.queries > instances:
        raise ConfigError("task.shots+task.queries", cfg.task.shots + cfg.task.queries,
                          f"at most {instances} (images in the smallest class or object of dataset {dataset})")


def check_command_line(argv: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """Reject a bad command line in one line before Hydra starts: Hydra's own messages span several lines,
    and it creates the run directory (and its log) before the run could check its config.

    Group options are checked for plain values and comma-separated sweeps (`algo=maml,anil`). A single run's
    overrides are composed and the whole config checked (check_config), and its run directory must be one
    this user can create. Sweeps check their search space themselves (simt.sweeping), before any trial runs.
    Returns a single run's directory as far as it resolves before Hydra starts, else None.
    """
    _check_group_options(argv, conf_dir)
    overrides = [arg for arg in argv if not arg.startswith("-")]
    if any(arg in ("-m", "--multirun") for arg in argv):
        for arg in overrides:
            if arg.startswith("hydra.sweep.dir=") and "$" not in arg:
                _check_writable("hydra.sweep.dir", arg.partition("=")[2])
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except HydraException as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise OverrideError(" ".join(lines[:2])) from None
    try:
        run_dir = cfg.hydra.run.dir
    except OmegaConfBaseException:  # e.g. ${hydra:runtime.choices.algo}: only Hydra's own run resolves it
        run_dir = None
    if run_dir is not None:
        _check_writable("hydra.run.dir", run_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        check_config(cfg)
    except OmegaConfBaseException as error:  # an interpolation that cannot resolve (a missing ${oc.env:...})
        raise OverrideError(" ".join(str(error).split())) from None
    return run_dir


def _check_writable(key: str, folder: str) -> None:
    """The folder exists and is writable, or its nearest existing parent is a folder this user may write."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, folder, f"a folder this user can create and write ({existing} is "
                                       f"{'not a folder' if not existing.is_dir() else 'not writable'})")


class OverrideError(ValueError):
    """A command-line override Hydra cannot apply (unknown key, bad syntax)."""


def _check_group_options(argv: list[str], conf_dir: Path) -> None:
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS or "(" in value or "$" in value:
            continue
        options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        for option in value.split(","):
            if option not in options:
                raise ConfigError(key, option, f"one of {', '.join(options)}")


# -- construction ----------------------------------------------------------------------------------

class BuildError(ValueError):
    """A constructor rejected its arguments (its message names the argument and what is allowed)."""


def _instantiate(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, with our constructors' one-line errors passed through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, DataError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):  # TypeError: an argument the constructor does not take
            raise BuildError(f"{node._target_}: {cause}") from None
        raise

@dataclass
class Experiment:
    dataset: FewShotDataset
    learner: object
    target: MomentumTarget | None
    device: torch.device
    test_dataset: FewShotDataset  # the training data set, or eval_dataset for cross-domain meta-test


def pick_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device", name, "auto or cpu (no CUDA device is available)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.active():  # torchrun: one GPU per process
        name = f"cuda:{distributed.local_rank()}"
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def cpu_threads(setting: int | None) -> int | None:
    """`trainer.threads`; null: torch's default (one thread per core) for a process alone, else its share of
    the cores: processes running beside it (parallel jobs of Hydra's joblib launcher, torchrun's local
    ranks) would otherwise each start one thread per core and slow one another down."""
    if setting:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = _processes_beside(cores)
    return max(1, cores // processes) if processes > 1 else None


def _processes_beside(cores: int) -> int:
    """How many processes of this run or sweep share the machine: torchrun's LOCAL_WORLD_SIZE, or the joblib
    launcher's n_jobs (-1: one per core) when this is one of its jobs."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return local
    launcher = HydraConfig.get().launcher
    n_jobs = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")) else None
    return local * (cores if n_jobs == -1 else n_jobs or 1)


def place_data(dataset: FewShotDataset, device: torch.device, setting: bool | str) -> FewShotDataset:
    """`trainer.data_on_device`: hold the splits on the training device, so tasks are gathered there (no
    host-to-device copy per task). `auto`: on a GPU when the images take at most a quarter of its free
    memory (mini-ImageNet: 1.1 GB in all; tiered-ImageNet: about 12 GB)."""
    if device.type == "cpu" or setting is False:
        return dataset
    if setting == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if dataset.nbytes > free / 4:
            log.info("data set %s (%.1f GB) stays in host memory: more than a quarter of the %.1f GB free on %s",
                     dataset.name, dataset.nbytes / 1e9, free / 1e9, device)
            return dataset
    log.info("data set %s (%.2f GB) held on %s", dataset.name, dataset.nbytes / 1e9, device)
    return dataset.to(device)


def build(cfg: DictConfig) -> Experiment:
    """Data, model, learner and (when SiMT is on) the momentum target, from a validated config."""
    device = pick_device(cfg.trainer.device)
    threads = cpu_threads(cfg.trainer.threads)
    if threads:
        torch.set_num_threads(threads)
    allocator.apply(cfg.trainer.get("keep_freed_memory", "auto"), device)  # absent from configs saved before it
    dataset: FewShotDataset = _instantiate(cfg.dataset)
    _check_task_fits(cfg, {name: split.classes for name, split in dataset.splits.items()},
                     min(split.smallest_class for split in dataset.splits.values()), dataset.name,
                     dataset.regression)
    on_device = cfg.trainer.get("data_on_device", "auto")  # absent from configs saved before the key existed
    dataset = place_data(dataset, device, on_device)
    test_dataset = dataset
    if cfg.get("eval_dataset"):
        test_dataset = _instantiate(cfg.eval_dataset)
        if (test_dataset.channels, test_dataset.image_size) != (dataset.channels, dataset.image_size):
            raise ConfigError("eval_dataset", test_dataset.name, f"images shaped like the training data "
                              f"({dataset.channels}x{dataset.image_size}x{dataset.image_size})")
        test = test_dataset.split("test")
        _check_task_fits(cfg, {"test": test.classes}, test.smallest_class, test_dataset.name)
        test_dataset = place_data(test_dataset, device, on_device)
    learner_cls = get_class(cfg.algo._target_)
    if learner_cls.embedding_model and dataset.regression:
        raise ConfigError("algo", cfg.algo._target_.rsplit(".", 1)[-1], f"a gradient-based learner (maml, "
                          f"fomaml, anil, metasgd) for the regression data set {dataset.name}")
    if dataset.regression and not cfg.backbone._target_.endswith("ConvRegressor"):
        log.warning("%s on the regression data set %s: with many flattened features the inner SGD on MSE can "
                    "diverge at algo.inner_lr=%s (Conv4 at 64x64 does); the official regression rows use "
                    "backbone=conv_regressor", cfg.backbone._target_.rsplit(".", 1)[-1], dataset.name,
                    cfg.algo.get("inner_lr"))
    backbone_extras = {}
    if cfg.backbone.get("output_activation") == "auto":
        backbone_extras["output_activation"] = dataset.output_activation
    torch.manual_seed(cfg.seed)  # initial weights
    model = _instantiate(
        cfg.backbone, in_channels=dataset.channels, image_size=dataset.image_size,
        out_features=None if learner_cls.embedding_model else dataset.target_dim or cfg.task.ways,
        drop_p=cfg.simt.drop_p if cfg.simt.enabled else 0.0,
        transductive_bn=not learner_cls.embedding_model, **backbone_extras,
    ).to(device)
    task_loss = {} if learner_cls.embedding_model else {"loss_fn": dataset.loss}  # ProtoNet: always CE
    learner = _instantiate(cfg.algo, model=model, **task_loss)
    target = None
    if cfg.simt.enabled:
        target = MomentumTarget(learner.meta_parameters(), learner.momentum_keys, learner.momentum_buffers(),
                                eta=cfg.simt.eta, lam=cfg.simt.lam, temp=cfg.simt.temp,
                                distillation="mse" if dataset.regression else "kl",
                                eta_schedule=cfg.simt.get("eta_schedule", "constant"),  # absent from older configs
                                per_task_distillation=OmegaConf.select(cfg, "compat.protonet_kl", default="mean")
                                if learner_cls.embedding_model else "mean")
    return Experiment(dataset, learner, target, device, test_dataset)


def _models(exp: Experiment) -> dict:
    """The networks evaluated: the student always, the momentum target when SiMT is on."""
    models = {"student": exp.learner.meta_parameters()}
    if exp.target is not None:
        models["target"] = exp.target.params
    return models


def _episodes(cfg: DictConfig, exp: Experiment, split: str, count: int):
    task = cfg.task
    data = exp.test_dataset if split == "test" else exp.dataset
    return data.split(split).episodes(task.ways, task.shots, task.queries, count, seed=cfg.trainer.episode_seed)


def eval_batch(cfg: DictConfig, exp: Experiment) -> int:
    """Episodes adapted at once at validation and test time (`trainer.eval_batch`). auto: 64 with the batched
    engine on a GPU (where one episode's kernels leave it idle; a chunk that does not fit is retried in
    halves), else 1: on a CPU batched evaluation is exact too but measured slower at the paper's sizes
    (README, Speed and scale), and 64 episodes of 84x84 images take gigabytes at once."""
    setting = cfg.trainer.get("eval_batch", "auto")
    if setting != "auto":
        return setting
    return 64 if exp.learner.engine == "batched" and exp.device.type == "cuda" else 1


def _evaluate(cfg: DictConfig, exp: Experiment, split: str, count: int, desc: str) -> dict[str, list[float]]:
    """Per-episode scores of the student (and the target) on the split's fixed episodes."""
    metric = (exp.test_dataset if split == "test" else exp.dataset).metric
    return evaluate(exp.learner, _models(exp), _episodes(cfg, exp, split, count), exp.device, metric, total=count,
                    desc=desc, progress=_progress(cfg), batch_size=eval_batch(cfg, exp))


def _progress(cfg: DictConfig) -> bool:
    return sys.stderr.isatty() if cfg.trainer.progress == "auto" else bool(cfg.trainer.progress)


def _test(cfg: DictConfig, exp: Experiment, path: Path) -> dict:
    """Load the weights of `path` (a best.pt) and score student and target on the fixed test episodes."""
    weights = checkpoint.load(path)
    with checkpoint.restoring(path):
        exp.learner.load_state_dict(weights["learner"])
        if exp.target is not None:
            exp.target.load_state_dict(weights["target"])
    metric = exp.test_dataset.metric
    scores = _evaluate(cfg, exp, "test", cfg.trainer.eval_tasks, desc="test")
    reported = "target" if exp.target is not None else "student"
    summary, name = summarize(scores, metric.name), metric.name
    return {f"test/{name}": summary[f"{reported}/{name}"], f"test/{name}_ci95": summary[f"{reported}/{name}_ci95"],
            **{f"test/{k}": v for k, v in summary.items()}, "reported_model": reported,
            "test_episodes": scores}


# -- entry points ----------------------------------------------------------------------------------

def run(cfg: DictConfig, run_dir: Path) -> float:
    """Train (or evaluate, mode=eval) one configuration; returns the objective for sweeps."""
    check_config(cfg)
    if cfg.mode == "eval":  # under torchrun rank 0 evaluates alone; it holds its directory as a training run does
        if not distributed.is_main():
            return float("nan")
        with checkpoint.hold_run_dir(run_dir):
            return evaluate_saved(cfg, run_dir)
    started, run_dir = time.time(), Path(distributed.broadcast_object(str(run_dir)))  # torchrun: rank 0's
    main = distributed.is_main()
    with contextlib.ExitStack() as lock:
        refused = None
        if main:
            try:
                lock.enter_context(checkpoint.hold_run_dir(run_dir))
            except CheckpointError as error:
                refused = str(error)
        refused = distributed.broadcast_object(refused)  # torchrun: every rank stops, not only rank 0
        if refused:
            raise CheckpointError(refused)
        return _train_and_test(cfg, run_dir, started, main)


def _train_and_test(cfg: DictConfig, run_dir: Path, started: float, main: bool) -> float:
    job_cfg, resolved = cfg, OmegaConf.to_container(cfg, resolve=True)
    finished = _finished_results(run_dir, cfg, resolved) if cfg.trainer.resume else None
    if finished:
        log.info("%s already finished with this config (hash %s): nothing to do", run_dir, finished["config_hash"])
        return float(finished["objective"])
    last = run_dir / checkpoint.LAST
    payload = checkpoint.load(last) if cfg.trainer.resume and last.is_file() else None
    if payload:
        saved = _saved_config(payload, last)
        kept = cfg.trainer.val_tasks
        cfg, resolved = _validation_as_saved(cfg, saved, resolved)
        if kept != cfg.trainer.val_tasks and main:
            log.warning("trainer.val_tasks=%s: the run being resumed validates on %s episodes, and so will the rest "
                        "of it", kept, cfg.trainer.val_tasks)
        _check_same_run(saved, resolved, last)
    elif cfg.trainer.resume and main:
        log.info("trainer.resume=true but %s has no checkpoint yet: starting from step 0", run_dir)

    if main:
        _record_config(run_dir, job_cfg)
    exp = build(cfg)
    optimizer = torch.optim.Adam(exp.learner.meta_parameters().values(), lr=cfg.trainer.lr)
    sampler = exp.dataset.split("train").sampler(train_ways(cfg), cfg.task.shots, cfg.task.queries, seed=cfg.seed,
                                                 min_shots=cfg.task.get("min_shots"))

    def score_validation(step: int) -> dict[str, float]:
        scores = _evaluate(cfg, exp, "val", cfg.trainer.val_tasks, desc=f"val@{step}")
        return {name: sum(values) / len(values) for name, values in scores.items()}

    from torch.utils.tensorboard import SummaryWriter  # deferred: slow import, only needed when training

    # purge_step drops events logged after the checkpoint by the interrupted process (or by an earlier
    # run in this directory), so every curve has exactly one point per step.
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=(payload["step"] if payload else 0) + 1) if main else None
    trainer = Trainer(exp.learner, exp.target, optimizer, sampler, score_validation, run_dir,
                      steps=cfg.trainer.steps, meta_batch_size=cfg.task.meta_batch_size,
                      eval_every=cfg.trainer.eval_every, checkpoint_every=cfg.trainer.checkpoint_every,
                      device=exp.device, metric=exp.dataset.metric, writer=writer, progress=_progress(cfg), config=resolved,
                      on_validation=trial_reporter(), precision=cfg.trainer.precision,
                      tasks_per_backward=cfg.trainer.get("tasks_per_backward"))
    if payload:
        with checkpoint.restoring(last):
            trainer.resume(payload)
    log.info("training %s%s on %s, steps %d..%d, run dir %s", cfg.algo._target_.rsplit(".", 1)[-1],
             " + SiMT" if exp.target is not None else "", exp.device, trainer.state.step + 1, cfg.trainer.steps,
             run_dir)
    try:
        state = trainer.fit()
    finally:
        if writer is not None:
            writer.close()
    if not main:  # rank 0 tests and writes the results; the other ranks' part is done
        return float("nan")

    test = _test(cfg, exp, run_dir / checkpoint.BEST)
    results = {**{k: v for k, v in test.items() if k != "test_episodes"},
               "val/best": state.best_value, "val/best_step": state.best_step, "val/history": state.history,
               "objective": state.best_value,
               "objective_direction": "maximize" if exp.dataset.metric.higher_is_better else "minimize",
               "steps": state.step, "wall_time_s": time.time() - started,
               "config": resolved, "config_hash": config_hash(resolved), "test_episodes": test["test_episodes"]}
    _write_json(results, run_dir / "results.json")
    name = exp.test_dataset.metric.name
    log.info("test %s %s %.3f ± %.3f (student %.3f, %d episodes); results in %s", test["reported_model"], name,
             test[f"test/{name}"], test[f"test/{name}_ci95"], test[f"test/student/{name}"], cfg.trainer.eval_tasks,
             run_dir / "results.json")
    return float(state.best_value)


def _record_config(run_dir: Path, cfg: DictConfig) -> None:
    """Write .hydra/{config,hydra,overrides}.yaml, as Hydra would, once the run holds its directory's lock and
    has passed the resume checks: conf/config.yaml turns Hydra's own copy off, which it writes before either,
    so a refused process would overwrite a live run's record."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # called from Python, not through run.py
        return
    hydra_cfg = HydraConfig.get()
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                       ("overrides.yaml", hydra_cfg.overrides.task)):
        write_atomic(run_dir / ".hydra" / name, OmegaConf.to_yaml(node))


# Keys a resumed run may change: how long to train and how to run it, not what is trained.
RESUMABLE_CHANGES = {"trainer.steps", "trainer.resume", "trainer.device", "trainer.threads", "trainer.progress", "algo.engine",
                     "trainer.checkpoint_every", "trainer.eval_tasks", "trainer.data_on_device", "trainer.eval_batch",
                     "trainer.keep_freed_memory", "trainer.tasks_per_backward", "mode", "checkpoint"}


# Keys that change how a run is carried out but not what it computes: left out of the config hash.
MECHANICS = {"trainer.resume", "trainer.threads", "trainer.progress", "trainer.checkpoint_every", "algo.engine",
             "trainer.data_on_device", "trainer.eval_batch", "trainer.keep_freed_memory", "trainer.tasks_per_backward",
             "mode", "checkpoint"}


DATA_GROUPS = ("dataset", "eval_dataset")  # the config groups that name a data set (and its `root`)


def is_data_location(key: str) -> bool:
    """Where the data files are read from (`data_dir`, and the `root` of a data set, made from it): moved data,
    another machine's SIMT_DATA, the same files. A run resumes and a finished run is recognised wherever
    its data now lives, so the key is neither checked on resume nor part of the config hash."""
    return key == "data_dir" or key in {f"{group}.root" for group in DATA_GROUPS}


# Keys added after runs were first written, with the value older runs had in effect: at that value they
# are left out of the config hash and of resume checks, so upgrading does not orphan finished results.
LATER_KEYS = {"trainer.precision": "fp32", "task.min_shots": None, "simt.eta_schedule": "constant",
              **{f"compat.{key}": value for key, value in yaml.safe_load((CONF_DIR / "compat" / "paper.yaml")
                                                                         .read_text()).items()},
              "algo.momentum_scope": "model", "algo.meta_batch": "per_task", "dataset.angle": "atan2",
              "backbone.embedding_dropout": True}


def config_hash(resolved: dict, with_roots: bool = False) -> str:
    """A short fingerprint of what a run computes, so a grid re-run can tell finished cells (results.json).
    `with_roots`: the fingerprint as versions before 2026-11-27 wrote it (`data_dir` left out, but the data
    sets' `root`, made from it, kept in)."""
    def hashed(key: str, value) -> bool:
        if key in MECHANICS or (key in LATER_KEYS and value == LATER_KEYS[key]):
            return False
        return not is_data_location(key) or (with_roots and key != "data_dir")

    flat = {key: value for key, value in _flatten(resolved).items() if hashed(key, value)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hashes(resolved: dict) -> set[str]:
    """The fingerprints a finished run of `resolved` may carry: this version's and the older one (which
    recognises older runs only where their data still is)."""
    return {config_hash(resolved), config_hash(resolved, with_roots=True)}


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _finished_results(run_dir: Path, cfg: DictConfig, resolved: dict) -> dict | None:
    """The run's results.json if it was written by a run of this very config (trainer.resume=true re-runs),
    its validation episodes as a resume would have kept them (_validation_as_saved)."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    _, resolved = _validation_as_saved(cfg, results.get("config") or {}, resolved)
    return results if results.get("config_hash") in config_hashes(resolved) else None


def _validation_as_saved(cfg: DictConfig, saved: dict, resolved: dict) -> tuple[DictConfig, dict]:
    """A resumed run validates on the checkpoint's number of episodes, whatever trainer.val_tasks says now
    (unless set, it follows trainer.eval_tasks, which a resume may change): the best model is chosen by
    comparing validations, so they must all use the same episodes."""
    kept = saved.get("trainer", {}).get("val_tasks")
    if kept is None or kept == cfg.trainer.val_tasks:
        return cfg, resolved
    cfg = OmegaConf.merge(cfg, {"trainer": {"val_tasks": kept}})
    return cfg, OmegaConf.to_container(cfg, resolve=True)


def resume_problem(cfg: DictConfig, run_dir: Path) -> str | None:
    """Why `cfg` could not continue the run in run_dir with trainer.resume=true (one line), or None: it can,
    or there is nothing to continue. The sweeper asks before retrying an interrupted trial in place."""
    run_dir = Path(run_dir)
    if checkpoint.run_dir_in_use(run_dir):
        return f"{run_dir} is in use by another process"
    last = run_dir / checkpoint.LAST
    if not last.is_file():
        return None
    try:
        saved = _saved_config(checkpoint.load(last), last)
        _, resolved = _validation_as_saved(cfg, saved, OmegaConf.to_container(cfg, resolve=True))
        _check_same_run(saved, resolved, last)
    except (ConfigError, CheckpointError) as error:
        return str(error)
    return None


def _saved_config(payload: dict, path: Path) -> dict:
    """The config a last.pt was written with: a dict whose groups are dicts, else a one-line CheckpointError."""
    saved = payload.get("config")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(group, {}), dict) for group in GROUPS):
        raise CheckpointError(f"checkpoint {path}: does not fit this run (its config is not a run config)")
    return saved


def _check_same_run(saved: dict, current: dict, path: Path) -> None:
    for key, (old, new) in _differences(saved, current).items():
        if key in LATER_KEYS and {old, new} <= {None, LATER_KEYS[key]}:
            continue
        if is_data_location(key):
            log.warning("%s=%s: the run being resumed read its data from %s (the same files, moved?)", key, new, old)
            continue
        if key not in RESUMABLE_CHANGES:
            raise ConfigError(key, new, f"{old!r} as in the checkpoint {path} it would resume "
                                        f"(start a new run directory to change it)")


def _differences(old, new, prefix: str = "") -> dict:
    """Flattened key -> (old, new) for every leaf that differs between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: v for key in old.keys() | new.keys()
                for k, v in _differences(old.get(key), new.get(key), f"{prefix}{key}.").items()}
    return {} if old == new else {prefix.rstrip("."): (old, new)}


def evaluate_saved(cfg: DictConfig, run_dir: Path) -> float:
    """mode=eval: rebuild a saved run from its own config, score its best weights on the test episodes
    (trainer.eval_tasks, trainer.episode_seed and trainer.device come from the command line)."""
    path = Path(cfg.checkpoint)
    path = path / checkpoint.BEST if path.is_dir() else path
    if not path.is_file():
        raise ConfigError("checkpoint", str(cfg.checkpoint), "a run directory containing best.pt, or a .pt file")
    run_keys = {"trainer": {k: cfg.trainer[k] for k in ("eval_tasks", "episode_seed", "device", "progress", "threads",
                                                        "eval_batch", "data_on_device")}}
    saved_cfg = _data_found_in(trusted_saved_config(checkpoint.load(path).get("config"), path, run_keys),
                               str(cfg.data_dir))
    _record_config(Path(run_dir), cfg)
    exp = build(saved_cfg)
    test = _test(saved_cfg, exp, path)
    _write_json({**test, "checkpoint": str(path)}, Path(run_dir) / "eval_results.json")
    name = exp.test_dataset.metric.name
    log.info("test %s %s %.3f ± %.3f over %d episodes", test["reported_model"], name, test[f"test/{name}"],
             test[f"test/{name}_ci95"], saved_cfg.trainer.eval_tasks)
    return float(test[f"test/{name}"])


# Hydra's instantiation keys: a config read from a file may name code with them, so it may only use `_target_`,
# at the root of a config group, and only as one of the project's own options in conf/ name it.
INSTANTIATION_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
BUILT_GROUPS = ("algo", "backbone", "dataset", "eval_dataset")


def own_targets(conf_dir: Path = CONF_DIR) -> dict[str, set[str]]:
    """group -> the `_target_`s that the group's options in conf/ name."""
    targets: dict[str, set[str]] = {group: set() for group in BUILT_GROUPS}
    for group in BUILT_GROUPS:
        for path in (conf_dir / group).glob("*.yaml"):
            target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
            if target:
                targets[group].add(target)
    return targets


def trusted_saved_config(config, path: Path, run_keys: dict | None = None) -> DictConfig:
    """The config saved in a checkpoint, once it is known to build only this project's own objects.

    A checkpoint may come from anyone, and `build` instantiates whatever `_target_` a config names: a crafted
    one could name `builtins.open` or `torch.load`. So every instantiation key must be a group's `_target_`
    that one of conf/'s options names, every value plain data and no interpolation, and check_config must
    pass once `run_keys` (how this machine runs it: {"trainer": {"threads": ...}}) are merged in."""
    try:  # OmegaConf's own form: tuples become lists (Hydra walks both), other objects are refused
        plain = OmegaConf.to_container(OmegaConf.create(config)) if isinstance(config, dict) and config else None
    except OmegaConfBaseException:
        plain = None
    if plain is None:
        raise CheckpointError(f"checkpoint {path}: no config of plain values in it (expected a checkpoint written "
                              f"by this tool)")
    allowed = own_targets()
    for key, value in _leaves(plain):
        name = key.rsplit(".", 1)[-1]
        group, _, rest = key.partition(".")
        if name in INSTANTIATION_KEYS and not (rest == "_target_" and value in allowed.get(group, ())):
            raise CheckpointError(f"checkpoint {path}: refused, its config sets {key}={value!r}, which is not one "
                                  f"of this project's config options")
        if isinstance(value, str) and "${" in value:
            raise CheckpointError(f"checkpoint {path}: refused, its config has an interpolation at {key}")
    saved = OmegaConf.merge(plain, run_keys or {})
    try:
        check_config(saved)
    except (ConfigError, OmegaConfBaseException) as error:
        raise CheckpointError(f"checkpoint {path}: refused, its config fails a check: "
                              f"{' '.join(str(error).split())}") from None
    return saved


def _leaves(tree, prefix: str = ""):
    """(dotted key, value) of every leaf of nested dicts and lists (list items keyed by their index), and of
    every key itself, so a key named like `_target_` is seen whatever its value."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        dotted = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            yield dotted, None
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def _data_found_in(saved: DictConfig, data_dir: str) -> DictConfig:
    """A saved run's config with each data set root that is gone re-based from the saved `data_dir` onto the
    command line's: the run was trained on another machine, or its data moved since (a root still there
    is kept, so that the command line's default data_dir does not replace a folder that works)."""
    old = str(saved.data_dir).rstrip("/")
    for group in DATA_GROUPS:
        root = OmegaConf.select(saved, f"{group}.root")
        if isinstance(root, str) and not Path(root).exists() and root.startswith(old + "/"):
            moved = os.path.join(data_dir, root[len(old) + 1:])
            log.info("%s.root: %s is gone; reading %s (data_dir=%s)", group, root, moved, data_dir)
            OmegaConf.update(saved, f"{group}.root", moved)
    return saved


def write_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so no reader ever sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(payload: dict, path: Path) -> None:
    write_atomic(path, json.dumps(payload, indent=1))


__all__ = ["BuildError", "CheckpointError", "ConfigError", "DataError", "NonFiniteError", "OverrideError", "build", "check_config",
           "check_command_line", "config_hash", "objective_direction", "run", "train_ways"]
