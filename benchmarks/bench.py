"""`make bench`: how fast a meta-training step is, engine by engine, against an official-style baseline.

Run from the repository root as a module:

    python -m benchmarks.bench                 # full sizes (see README.md: long on a CPU)
    python -m benchmarks.bench --quick         # tiny sizes, seconds; what the test suite runs
    python -m benchmarks.bench --device cuda   # cpu | cuda | auto (default: CUDA when there is one)

For every setting (backbone, image size, shots), algorithm (MAML second order, ProtoNet), with and
without SiMT, and engine (`loop`, `batched`, `higher`, and `official`: the official-style step of
benchmarks/official.py, MAML task by task, ProtoNet one pass over the meta-batch), one meta-step is the
trainer's: sample the meta-batch, copy it to the device, outer loss, backward, Adam step, momentum update
(the official-style step takes its meta-batch already decoded, as torchmeta's DataLoader hands it: a
pool decoded from PNG before the timing; decoding is timed on its own). Reported per row: the median time over warm
repeats, the peak memory of one step, FLOPs per step and the fraction of a measured matmul peak they
reach, and the speed ratio against the official-style row (official ms / engine ms: > 1 is faster).
Two more tables time test-time evaluation (per 2,000 tasks: one episode at a time, batched under vmap,
and the official-style loop on episodes decoded beforehand) and task sampling (in-memory TaskSampler
against per-image PNG decoding: the data loading that the official-style rows leave out).
The tables are printed and written to benchmarks/results/.
"""
import argparse
import copy
import dataclasses
import datetime
import gc
import itertools
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.official import MetaBatch, OfficialMAML, OfficialProtoNet, PngEpisodes, PngImages
from simt import allocator, pipeline
from simt.data.synthetic import synthetic
from simt.data.tasks import TaskSampler
from simt.evaluator import accuracy, evaluate, largest_chunk
from simt.trainer import meta_batch_backward

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The official-style rows take data already decoded, as torchmeta's DataLoader hands it: pools of this many
# meta-batches (training) or tasks (evaluation), decoded from PNG before the timing and cycled through.
OFFICIAL_POOL = 4
OFFICIAL_EVAL_POOL = 16
ENGINES = ("official", "loop", "batched", "higher")  # official first: every ratio refers to it
CUDA_ENGINES = (*ENGINES, "batched bf16",  # + trainer.precision=bf16 (autocast: CUDA's tensor cores)
                "batched halves")  # + trainer.tasks_per_backward=meta-batch/2: about half the graph's memory
# + the loop with glibc's default malloc settings (trainer.keep_freed_memory=false), as the official-style rows
# run: their ratio is the code's alone, without the allocator setting that run.py applies on a CPU. It is
# timed right after the official row, so that the round-robin switches the allocator settings only twice.
CPU_ENGINES = (ENGINES[0], "loop glibc", *ENGINES[1:])
ALGOS = ("maml", "protonet")
EVAL_TASKS = 2000  # the evaluation table reports time per this many test tasks
EVAL_BATCH = 100  # default episodes per vmapped chunk of the batched evaluation (evaluate(batch_size=...))
SPLIT_CLASSES = "{train:10,val:5,test:10}"  # enough classes for 5-way episodes; small, so builds are quick
COLUMNS = ("setting", "algo", "SiMT", "engine", "n", "ms/step", "peak MB", "ops/step", "GFLOP/step", "GFLOP/s",
           "% matmul peak", "vs official")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row group of the table: a backbone on one image shape and episode shape."""

    backbone: str  # conv4 | resnet12
    image_size: int
    channels: int
    shots: int
    algos: tuple[str, ...] = ALGOS
    ways: int = 5
    queries: int = 15
    meta_batch: int = 4
    inner_steps: int = 5  # second order while training
    eval_inner_steps: int = 10  # first order at test time
    width: int | None = None  # None: the official widths; --quick narrows every layer to this
    eval_batch: int = EVAL_BATCH  # episodes per chunk in the batched evaluation column

    @property
    def label(self) -> str:
        size = f"{self.image_size}x{self.image_size}x{self.channels}"
        return f"{self.backbone} {size} {self.ways}w{self.shots}s"


FULL = (  # the settings of the paper's tables (synthetic images of their shape)
    Setting("conv4", 28, 1, shots=1),
    Setting("conv4", 28, 1, shots=5),
    Setting("conv4", 84, 3, shots=1),
    Setting("conv4", 84, 3, shots=5),
    # The MAML-family ResNet-12 (widths 64-128-256-512, meta-BatchNorm): its ProtoNet flavour is another network.
    # Batched evaluation in chunks of 25 episodes: 100 (7,500 84x84 query images through 64-wide residual
    # blocks, 13.5 GB per float32 activation, several alive at once) would likely not fit an 80 GB GPU (estimated).
    Setting("resnet12", 84, 3, shots=1, algos=("maml",), eval_batch=25),
)
TINY = dict(queries=3, meta_batch=2, inner_steps=1, eval_inner_steps=2, width=8)
QUICK = (  # seconds in all: every code path (1 and 3 channels, both algorithms, every engine), tiny sizes
    Setting("conv4", 28, 1, shots=1, **TINY),
    Setting("conv4", 32, 3, shots=1, **TINY),
    Setting("resnet12", 32, 3, shots=1, algos=("maml",), **TINY),
)


def settings(quick: bool, device: torch.device) -> list[Setting]:
    """The settings run. ResNet-12 steps are slow on a CPU: there it runs only in the full mode."""
    chosen = QUICK if quick else FULL
    return [s for s in chosen if not (quick and device.type == "cpu" and s.backbone == "resnet12")]


# -- building what is measured ---------------------------------------------------------------------

def compose_config(setting: Setting, algo: str, simt: bool, device: torch.device, threads: int) -> DictConfig:
    """The run config of one row group (engine `loop`), as `python run.py <overrides>` would compose it, on
    synthetic data of the setting's image shape."""
    overrides = [
        "dataset=synthetic", f"dataset.image_size={setting.image_size}", f"dataset.channels={setting.channels}",
        f"dataset.instances={max(20, setting.shots + setting.queries)}", f"dataset.split_classes={SPLIT_CLASSES}",
        f"backbone={setting.backbone}", f"algo={algo}", "algo.engine=loop", f"simt.enabled={str(simt).lower()}",
        f"task.ways={setting.ways}", f"task.shots={setting.shots}", f"task.queries={setting.queries}",
        f"task.meta_batch_size={setting.meta_batch}", f"trainer.device={device}", f"trainer.threads={threads}",
    ]
    if algo == "maml":
        overrides += [f"algo.inner_steps={setting.inner_steps}", f"algo.eval_inner_steps={setting.eval_inner_steps}"]
    else:
        overrides += ["algo.train_ways=null"]  # 5-way training episodes like every other row (official: 20-way)
    if setting.width is not None:
        overrides += [f"backbone.hidden={setting.width}" if setting.backbone == "conv4"
                      else f"backbone.widths=[{','.join([str(setting.width)] * 4)}]"]
    with initialize_config_dir(config_dir=str(pipeline.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    pipeline.check_config(cfg)
    return cfg


def build(cfg: DictConfig, engine: str):
    """The learner and momentum target exactly as `run.py` builds them (pipeline.build), with `algo.engine`
    set to `engine`. Every engine gets the same initial weights (the config's seed)."""
    return pipeline.build(OmegaConf.merge(cfg, {"algo": {"engine": engine}}))


def engine_step(exp, cfg, setting: Setting, precision: str = "fp32",
                tasks_per_backward: int | None = None) -> Callable[[], None]:
    """One training step as simt.trainer.Trainer.fit runs it (without its logging and finiteness checks).
    The data set is where pipeline.build put it: on a GPU, on the device (trainer.data_on_device=auto)."""
    learner, target, device = exp.learner, exp.target, exp.device
    optimizer = torch.optim.Adam(learner.meta_parameters().values(), lr=cfg.trainer.lr)
    sampler = exp.dataset.split("train").sampler(setting.ways, setting.shots, setting.queries, seed=cfg.seed)

    def step():
        tasks = [sampler.sample().to(device) for _ in range(setting.meta_batch)]
        optimizer.zero_grad(set_to_none=True)
        meta_batch_backward(learner, target, tasks, precision=precision, tasks_per_backward=tasks_per_backward)
        optimizer.step()
        if target is not None:
            target.update(learner.meta_parameters(), step=1)  # a constant η: the step does not matter
    return step


def official_learner(exp, cfg, setting: Setting, algo: str):
    """The official-style learner on a copy of our freshly built network (same initial weights)."""
    model = copy.deepcopy(exp.learner.model)
    momentum = None
    if exp.target is not None:
        momentum = {"eta": exp.target.eta, "lam": exp.target.lam, "temp": exp.target.temp}
    if algo == "maml":
        learner = exp.learner
        return OfficialMAML(model, learner.inner_lr, learner.inner_steps, learner.eval_inner_steps,
                            lr=cfg.trainer.lr, momentum=momentum)
    return OfficialProtoNet(model, lr=cfg.trainer.lr, momentum=momentum, ways=setting.ways)


def _with_glibc_defaults(step: Callable[[], None]) -> Callable[[], None]:
    def run():
        with allocator.glibc_defaults():
            step()
    return run


def official_pool(setting: Setting, png: PngImages, seed: int) -> list[MetaBatch]:
    """OFFICIAL_POOL meta-batches decoded from PNG (PIL + ToTensor, image by image) and stacked, (tasks, N, C,
    H, W) as torchmeta's DataLoader hands them: the episode shapes of our engines' rows (setting.ways-way,
    also for ProtoNet: algo.train_ways=null)."""
    episodes = PngEpisodes(png, setting.ways, setting.shots, setting.queries, seed=seed)
    return [MetaBatch.stack([episodes.sample() for _ in range(setting.meta_batch)]) for _ in range(OFFICIAL_POOL)]


def official_step(exp, cfg, setting: Setting, algo: str, png: PngImages) -> Callable[[], None]:
    """The official-style step on meta-batches decoded beforehand (the decoding is timed in the task-sampling
    table, not here): copy the next one of the pool to the device, then the learner's meta-step."""
    learner = official_learner(exp, cfg, setting, algo)
    batches = itertools.cycle(official_pool(setting, png, seed=cfg.seed))

    def step():
        learner.meta_step(next(batches).to(exp.device))
    return step


# -- measuring -------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: a timer must wait for them
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` takes, device work included."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def median_seconds(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):  # first calls pay for allocator growth, kernel selection, lazy imports
        step()
    return statistics.median(timed(step, device) for _ in range(repeats))


def interleaved_median_seconds(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                               repeats: int) -> dict[str, float]:
    """Median seconds per step of every engine, timed round-robin (A, B, C, A, B, C, ...): a change in the
    machine's load during the run then falls on every engine alike instead of on whichever ran at the time."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CPU_MEMORY_METHOD = ("peak resident-set growth during one extra step over the RSS just before it, sampled "
                     "every 1 ms from /proc/self/statm after malloc_trim(0) (torch's CPU allocator is invisible "
                     "to tracemalloc); without /proc, the growth of getrusage's ru_maxrss high-water mark")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during one extra step, minus what was allocated before it"


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> float:
    """Peak extra memory of one step (weights, optimizer state and data already resident are not counted).

    Measured in a step of its own, outside the timed ones: on CPU a sampling thread competes for the GIL.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    gc.collect()
    allocator.release()  # so that the next step's growth in RSS is its own
    if not os.path.exists("/proc/self/statm"):
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * unit / 2**20
    before, peak, done = _resident_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak[0], _resident_bytes()) - before) / 2**20


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one step as FlopCounterMode counts them: convolutions and matrix products, forward and
    every backward (double backward included); element-wise work is not counted."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(step: Callable[[], None]) -> int:
    """Tensor ops dispatched by one step (forward, backward and optimizer alike; views included). Where a
    step is far from the FLOP peak (a GPU at these sizes), its time follows this count, not its FLOPs."""
    with _OpCounter() as counter:
        step()
    return counter.count


def matmul_peak_flops(device: torch.device, quick: bool) -> tuple[float, int]:
    """FLOP/s of a large float32 matrix product on `device`: the yardstick for the % column."""
    n = 8192 if device.type == "cuda" else (1024 if quick else 2048)
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, device, warmup=2, repeats=3 if quick else 5)
    return 2 * n**3 / seconds, n


# -- the three tables ------------------------------------------------------------------------------

def step_rows(setting: Setting, device: torch.device, args, peak_flops: float) -> list[dict]:
    """Every (algo, SiMT, engine) of one setting."""
    repeats = args.repeats if args.repeats else (1 if device.type == "cpu" and setting.backbone == "resnet12"
                                                 else (5 if device.type == "cpu" else 10))
    png = None
    rows = []
    for algo in setting.algos:
        for simt in (False, True):
            cfg = compose_config(setting, algo, simt, device, args.threads)
            steps, ops, flops = {}, {}, None
            engines = [e for e in (CUDA_ENGINES if device.type == "cuda" else CPU_ENGINES) if e in args.engines]
            for engine in engines:
                name, _, variant = engine.partition(" ")
                exp = build(cfg, "loop" if engine == "official" else name)
                if engine == "official":
                    if png is None:  # encode the training split once per setting: same pixels for every row
                        split = exp.dataset.split("train")
                        png = PngImages(split.images, split.offsets)
                    step = official_step(exp, cfg, setting, algo, png)
                else:
                    step = engine_step(exp, cfg, setting, "bf16" if variant == "bf16" else "fp32",
                                       max(1, setting.meta_batch // 2) if variant == "halves" else None)
                # The official code runs with the C library's allocator settings; ours with trainer.keep_freed_memory
                # (auto: on for a CPU, as pipeline.build set it). On CUDA both are no-ops.
                steps[engine] = _with_glibc_defaults(step) if engine == "official" or variant == "glibc" else step
                ops[engine] = count_ops(steps[engine])  # also a warm-up step
                if engine == "loop":
                    flops = count_flops(steps[engine])
            seconds = interleaved_median_seconds(steps, device, args.warmup, repeats)
            memory = {engine: peak_memory_mb(step, device) for engine, step in steps.items()}
            del steps, exp
            _free(device)
            for engine in engines:
                rate = flops / seconds[engine]
                rows.append({"setting": setting.label, "algo": algo, "SiMT": "yes" if simt else "no", "engine": engine,
                             "n": repeats, "ms/step": 1e3 * seconds[engine], "peak MB": memory[engine],
                             "ops/step": ops[engine],
                             "GFLOP/step": flops / 1e9, "GFLOP/s": rate / 1e9, "% matmul peak": 100 * rate / peak_flops,
                             "vs official": seconds["official"] / seconds[engine]})
            print(f"  {setting.label} {algo} simt={simt}: "
                  + ", ".join(f"{e} {1e3 * s:.1f} ms" for e, s in seconds.items()), file=sys.stderr, flush=True)
    return rows


EVAL_ROUNDS = 4


def interleaved_eval_seconds(one: Callable[[int], None], batched: Callable[[int], None],
                             official: Callable[[int], None], count: int, batch: int,
                             device: torch.device) -> dict[str, float]:
    """Seconds for `count` tasks each way. One at a time and official-style take turns on a share of the
    tasks each (a machine shared with other work slows both alike, not whichever ran during the slow
    minute): EVAL_ROUNDS shares, or fewer where that lets each share hold a whole batch, so that the batched
    evaluation joins the turns (with one batch or none per share, it runs alone, after them)."""
    whole_batches = count // max(batch, 1)
    rounds = min(EVAL_ROUNDS, whole_batches) if whole_batches >= 2 else min(EVAL_ROUNDS, count)
    shares = [count // rounds + (k < count % rounds) for k in range(rounds)]
    batched_in_rounds = whole_batches >= 2
    seconds = {"one": 0.0, "batched": 0.0, "official": 0.0}
    for share in shares:
        seconds["one"] += timed(lambda: one(share), device)
        if batched_in_rounds:
            seconds["batched"] += timed(lambda: batched(share), device)
        seconds["official"] += timed(lambda: official(share), device)
    if not batched_in_rounds:
        seconds["batched"] = timed(lambda: batched(count), device)
    return seconds


def eval_rows(setting: Setting, device: torch.device, args, peak_flops: float) -> list[dict]:
    """Test-time evaluation of one model (student) on `count` tasks, scaled to EVAL_TASKS; ours (in-memory
    episodes, simt.evaluator.evaluate) one episode at a time and in chunks of `setting.eval_batch` episodes
    (vmap), against the official-style loop (a pool of episodes decoded from PNG beforehand, per-task
    adaptation). The FLOPs of one episode
    (counted once) give the batched evaluation's fraction of the matmul peak: what bounds its speed-up."""
    count = args.eval_tasks or (3 if args.quick else EVAL_TASKS if device.type == "cuda"
                                else 10 if setting.backbone == "resnet12" else 100)
    rows = []
    for algo in setting.algos:
        cfg = compose_config(setting, algo, False, device, args.threads)
        exp = build(cfg, "loop")
        test = exp.dataset.split("test")
        # As evaluate() would cut it: no activation of a chunk beyond what cuDNN takes (simt.evaluator).
        episode = next(iter(test.episodes(setting.ways, setting.shots, setting.queries, 1, seed=0)))
        batch = largest_chunk(exp.learner.model, episode.to(device), min(setting.eval_batch, count))
        official = official_learner(exp, cfg, setting, algo)
        png = PngEpisodes(PngImages(test.images, test.offsets), setting.ways, setting.shots, setting.queries,
                          seed=cfg.trainer.episode_seed)
        # Decoded before the timing, as the official loader hands tensors (decoding: the task-sampling table).
        pool = itertools.cycle([png.sample() for _ in range(min(count, OFFICIAL_EVAL_POOL))])
        models = {"student": exp.learner.meta_parameters()}

        def ours(n, batch_size=1):
            episodes = test.episodes(setting.ways, setting.shots, setting.queries, n, seed=cfg.trainer.episode_seed)
            evaluate(exp.learner, models, episodes, device, batch_size=batch_size)

        def theirs(n):
            with allocator.glibc_defaults():  # as the official code runs
                for _ in range(n):  # scored per task, as evaluate() does (one host sync per task on CUDA)
                    task = next(pool).to(device)
                    accuracy(official.eval_logits(task), task.query_y)

        ours(1), ours(batch, batch), theirs(1)  # warm-up (the batched one at the timed batch size)
        flops = count_flops(lambda: ours(1))
        seconds = interleaved_eval_seconds(ours, lambda n: ours(n, batch), theirs, count, batch, device)
        scale = EVAL_TASKS / count
        rows.append({"setting": setting.label, "algo": algo, "tasks timed": count, "batch": batch,
                     f"one at a time s/{EVAL_TASKS}": seconds["one"] * scale,
                     f"batched s/{EVAL_TASKS}": seconds["batched"] * scale,
                     f"official s/{EVAL_TASKS}": seconds["official"] * scale,
                     "one at a time vs official": seconds["official"] / seconds["one"],
                     "batched vs official": seconds["official"] / seconds["batched"],
                     "batched vs one at a time": seconds["one"] / seconds["batched"],
                     "GFLOP/task": flops / 1e9,
                     "batched % matmul peak": 100 * flops * count / seconds["batched"] / peak_flops})
        del exp, official
        _free(device)
    return rows


def sampling_rows(args) -> list[dict]:
    """Tasks per second: our TaskSampler on in-memory uint8 images against decoding each image from PNG
    (PIL + ToTensor), on kanji-sized images (28x28x1, 20 per class; the kanji train split has 700 classes)."""
    classes, count = (20, 50) if args.quick else (700, 300)
    split = synthetic({"train": classes}, instances=20, image_size=28, channels=1).split("train")
    png = PngImages(split.images, split.offsets)
    rows = []
    for shots in (1, 5):
        ours = TaskSampler(split.images, 5, shots, 15, seed=0, offsets=split.offsets)
        theirs = PngEpisodes(png, 5, shots, 15, seed=0)
        rates = {}
        for name, sampler in (("TaskSampler", ours), ("PNG decode", theirs)):
            sampler.sample()
            rates[name] = count / timed(lambda: [sampler.sample() for _ in range(count)], torch.device("cpu"))
        rows.append({"images": f"28x28x1, {classes} classes", "episode": f"5w{shots}s, 15 queries",
                     "tasks timed": count, "TaskSampler tasks/s": rates["TaskSampler"],
                     "PNG decode tasks/s": rates["PNG decode"],
                     "ratio": rates["TaskSampler"] / rates["PNG decode"]})
    return rows


def _free(device: torch.device) -> None:
    gc.collect()
    allocator.release()  # what trainer.keep_freed_memory kept for the last rows' allocation pattern
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- output ----------------------------------------------------------------------------------------

def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    return f"{value:.0f}" if magnitude >= 100 else f"{value:.1f}" if magnitude >= 10 else \
        f"{value:.2f}" if magnitude >= 0.1 or value == 0 else f"{value:.2g}"


def markdown_table(rows: list[dict], *ratio_keys: str) -> str:
    if not rows:
        return "(not measured yet)"
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        cells = [fmt(row[h]) + ("×" if h in ratio_keys else "") for h in headers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(args, device: torch.device, peak_flops: float, matmul_n: int, cpu_cores: int) -> str:
    memory = CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    tf32 = ""
    if device.type == "cuda":  # TF32 convolutions (cuDNN's default) can outrun the float32 matmul yardstick
        tf32 = (f"; TF32 allowed: matmul {torch.backends.cuda.matmul.allow_tf32}, "
                f"cuDNN {torch.backends.cudnn.allow_tf32}")
    quick = ("--quick: tiny sizes (every layer 8 wide, 3 queries, meta-batch 2, 1 inner step, 2 at test, 1-shot "
             "only); its numbers measure overheads, not the paper's settings" if args.quick else
             "full sizes: official widths, 15 queries, meta-batch 4, 5 second-order inner steps (10 first-order at test)")
    return "\n".join([
        f"# SiMT meta-step benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- device: {device.type}, {device_name(device)}"
        + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""),
        f"- torch {torch.__version__}, Python {platform.python_version()}, torch threads {torch.get_num_threads()} "
        f"(interop {torch.get_num_interop_threads()}), CPU cores available {cpu_cores}, load average {load}",
        f"- mode: {quick}",
        f"- matmul peak: {peak_flops / 1e9:.1f} GFLOP/s (float32, {matmul_n}x{matmul_n} @ {matmul_n}x{matmul_n}){tf32}",
        f"- peak memory: {memory}",
        f"- command: python -m benchmarks.bench {' '.join(sys.argv[1:])}",
    ])


STEP_NOTES = """\
A step is the trainer's: sample the meta-batch, copy it to the device, outer loss, backward, Adam, momentum
update. Our engines sample with TaskSampler on in-memory uint8 images inside the step; the official-style
step takes a meta-batch already decoded and stacked (tasks, N, C, H, W), as torchmeta's DataLoader hands it
(a pool of a few meta-batches decoded from PNG before the timing, cycled): its loading is not in its time
(per-image PNG decoding: the task-sampling table). Official-style MAML runs task by task (a backward per
task); official-style ProtoNet embeds the whole meta-batch in one pass for the supports and one for the
queries (BatchNorm statistics shared by its tasks, KL summed over a task's queries: what our compat=official
computes), against our default ProtoNet (compat=paper: each task with its own BatchNorm statistics) on the
same episodes: the same convolutions, batched differently.
`n`: timed repeats after warm-up, taken round-robin over the engines (median reported). `vs official`: official ms / engine ms (> 1: faster).
FLOPs (convolutions and matrix products, double backward included) are counted once per (setting, algo,
SiMT) on the loop engine with torch.utils.flop_counter.FlopCounterMode and used for every engine (the same
convolutions and matrix products). `ops/step`: tensor ops dispatched by one step of that engine (a TorchDispatchMode count,
views included): where a step runs far below the matmul peak, its time follows this count, not its FLOPs.
All rows use 5-way episodes, the official-style ProtoNet too (the official code trains it on 20-way ones).
ProtoNet has no inner loop: its `higher` row runs the loop's code. The ResNet-12 rows are the MAML-family
network. On CUDA the images are held on the GPU (trainer.data_on_device=auto) for our engines (the
official-style step copies its decoded meta-batch from the CPU, as the official code does), `batched bf16`
is the batched engine under trainer.precision=bf16, and `batched halves` the batched engine with
trainer.tasks_per_backward = half the meta-batch (two graphs of 2 tasks per step instead of one of 4)."""


def _row(rows: list[dict], **match) -> dict | None:
    return next((row for row in rows if all(row.get(k) == v for k, v in match.items())), None)


def targets(device: torch.device, steps: list[dict], evals: list[dict], sampling: list[dict]) -> list[dict]:
    """The issue's speed and memory targets, each with the measured ratio and whether it is met."""
    found = []

    def check(what: str, value: float | None, goal: float | None, higher: bool = True) -> None:
        met = None if value is None or goal is None else (value >= goal if higher else value <= goal)
        # Three significant digits: a ratio of 0.998 must not print as a "1.00" that misses a 1.0 goal.
        found.append({"target": what, "measured": None if value is None else f"{value:.3g}",
                      "goal": "(for information)" if goal is None else f"{'>=' if higher else '<='} {goal}",
                      "met": "n/a" if met is None else ("yes" if met else "NO")})

    if device.type == "cpu":
        default = [row["vs official"] for row in steps if row["engine"] == "loop"]  # algo.engine=auto on a CPU
        check("default engine (loop) vs official, slowest row", min(default) if default else None, 1.0)
        alone = [row["vs official"] for row in steps if row["engine"] == "loop glibc"]
        check("loop with glibc's malloc defaults vs official, slowest row", min(alone) if alone else None, None)
    else:
        key = dict(setting="conv4 28x28x1 5w1s", algo="maml", SiMT="yes")
        loop, batched = _row(steps, engine="loop", **key), _row(steps, engine="batched", **key)
        both = loop is not None and batched is not None
        check("batched vs loop speed, Conv4 5w1s MAML+SiMT", loop["ms/step"] / batched["ms/step"] if both else None, 3.0)
        check("batched / loop peak memory, same row", batched["peak MB"] / loop["peak MB"] if both else None, 2.0,
              higher=False)
        halves = _row(steps, engine="batched halves", **key)  # trainer.tasks_per_backward=2: the memory trade
        check("batched halves / loop peak memory, same row",
              halves["peak MB"] / loop["peak MB"] if halves and loop else None, 2.0, higher=False)
        check("batched halves vs loop speed, same row",
              loop["ms/step"] / halves["ms/step"] if halves and loop else None, None)
        one = f"one at a time s/{EVAL_TASKS}"
        ratios = [row[one] / row[f"batched s/{EVAL_TASKS}"] for row in evals]
        check(f"batched vs one-at-a-time evaluation, slowest row", min(ratios) if ratios else None, 5.0)
    rates = [row["ratio"] for row in sampling]
    check("TaskSampler vs per-image PNG decode, slowest row", min(rates) if rates else None, 10.0)
    return found


def resnet_note(device: torch.device, quick: bool) -> str:
    if device.type != "cpu":
        return ""
    if quick:
        return "\nResNet-12 is left out of --quick on a CPU (minutes per step); the full mode runs it."
    return "\nResNet-12 on a CPU: minutes per step, so 1 warm-up and 1 timed repeat (unless --repeats)."


def report(args, device, peak_flops, matmul_n, cpu_cores, steps, evals, sampling, failures=()) -> str:
    failed = ["## Settings that failed (their rows are missing)", "\n".join(failures)] if failures else []
    return "\n\n".join([
        header(args, device, peak_flops, matmul_n, cpu_cores),
        "## Meta-training step", markdown_table(steps, "vs official"), STEP_NOTES + resnet_note(device, args.quick),
        f"## Test-time evaluation, seconds per {EVAL_TASKS} tasks",
        markdown_table(evals, "one at a time vs official", "batched vs official", "batched vs one at a time"),
        f"One model (the student; SiMT runs also score the target: twice the time). `tasks timed` tasks were run "
        f"and the time scaled to {EVAL_TASKS}. MAML: first-order adaptation, then the query pass. `one at a time`: "
        f"simt.evaluator.evaluate episode by episode; `batched`: evaluate(batch_size=`batch`), that many episodes "
        f"adapted and scored at once under vmap (same scores); official: the official-style per-task loop, on a "
        f"pool of {OFFICIAL_EVAL_POOL} episodes decoded from PNG before the timing (cycled). "
        f"`GFLOP/task`: one episode's convolutions and matrix products (FlopCounterMode); `batched % matmul peak`: "
        f"the batched evaluation's FLOP/s against the matmul peak above (float32; cuDNN may use TF32).",
        "## Task sampling (CPU)", markdown_table(sampling, "ratio"),
        "Data loading, outside the meta-training step's official-style rows (they take decoded tensors): an "
        "episode drawn by our TaskSampler from in-memory uint8 images against one assembled image by image from "
        "PNG bytes (PIL decode + ToTensor per image, a torchvision-style Dataset).",
        "## Targets (ratios measured in this run)", markdown_table(targets(device, steps, evals, sampling)),
        *failed,
    ]) + "\n"


def output_path(args, device: torch.device) -> Path:
    if args.out:
        return Path(args.out)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return RESULTS_DIR / f"{date}-{device.type}{'-quick' if args.quick else ''}.md"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): for the test suite")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores available)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default: 1, CUDA 3)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per row (default: 5 on CPU, 1 for ResNet-12 on CPU, 10 on CUDA; --quick 2)")
    parser.add_argument("--eval-tasks", type=int, default=None,
                        help=f"test tasks timed (default: {EVAL_TASKS} on CUDA, 100 on CPU, 10 for ResNet-12 on "
                             f"CPU, 3 with --quick), scaled to {EVAL_TASKS}")
    parser.add_argument("--only", default=None, help="run only the settings whose label contains this text, "
                                                     "e.g. 'conv4 28x28'")
    parser.add_argument("--engines", default=",".join(sorted(set(CUDA_ENGINES + CPU_ENGINES))),
                        help="comma-separated engine rows to time (default: all for the device); official is "
                             "always timed: every ratio refers to it")
    parser.add_argument("--out", default=None, help="where to write the tables (default: benchmarks/results/"
                                                    "<date>-<device>[-quick].md)")
    args = parser.parse_args(argv)
    args.engines = {"official", *(name.strip() for name in args.engines.split(","))}
    known = set(CUDA_ENGINES + CPU_ENGINES)
    if args.engines - known:
        parser.error(f"--engines: unknown {', '.join(sorted(args.engines - known))}; expected some of "
                     f"{', '.join(sorted(known))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cpu_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.threads = args.threads or cpu_cores
    torch.set_num_threads(args.threads)  # recorded in the header; pipeline.build sets the same
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 1
    if args.quick and args.repeats is None:
        args.repeats = 2
    chosen = [s for s in settings(args.quick, device) if args.only is None or args.only in s.label]
    if not chosen:
        print(f"--only {args.only!r} matches no setting", file=sys.stderr)
        return 2
    started = time.perf_counter()
    peak_flops, matmul_n = matmul_peak_flops(device, args.quick)
    path = output_path(args, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps, evals, sampling, failures = [], [], [], []
    for done, setting in enumerate(chosen, 1):
        try:
            steps += step_rows(setting, device, args, peak_flops)
            evals += eval_rows(setting, device, args, peak_flops)
        except RuntimeError as error:  # torch.OutOfMemoryError among them: the other settings still run
            traceback.print_exc()
            failures.append(f"- {setting.label}: {type(error).__name__}: {str(error).splitlines()[0]}")
            _free(device)
        # Written after every setting, so that a long run stopped early keeps what it measured.
        path.write_text(report(args, device, peak_flops, matmul_n, cpu_cores, steps, evals, sampling, failures)
                        + f"\nPartial: {done} of {len(chosen)} settings so far, "
                          f"{time.perf_counter() - started:.0f} s.\n")
    sampling = sampling_rows(args)
    text = report(args, device, peak_flops, matmul_n, cpu_cores, steps, evals, sampling, failures)
    text += f"\nWall time of the whole benchmark: {time.perf_counter() - started:.0f} s.\n"
    path.write_text(text)
    print(text)
    print(f"written to {path}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
