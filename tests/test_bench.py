"""The benchmark (benchmarks/bench.py): the --quick run end to end, and that its official-style baseline
computes what our loop engine computes, so that its speed ratios compare two implementations of one thing."""
import copy
import itertools
import math
import subprocess
import sys

import pytest
import torch

from benchmarks import bench
from benchmarks.official import MetaBatch, OfficialMAML, OfficialProtoNet, PngImages
from simt.algorithms import GradientLearner, ProtoNet
from simt.data.tasks import Task
from simt.models import Conv4, ResNet12
from simt.momentum import MomentumTarget
from simt.trainer import meta_batch_loss
from tests.conftest import ROOT, make_cfg

F64 = torch.float64
WAYS = 3


def _table(text: str, title: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table under the heading `title`: its header and its rows, cells stripped."""
    lines = text.split(f"## {title}", 1)[1].strip().splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[0], rows[2:]  # rows[1] is the |---| line


def _number(cell: str) -> float:
    value = float(cell.rstrip("×"))
    assert math.isfinite(value), cell
    return value


def test_quick_benchmark_prints_and_writes_the_tables(tmp_path):
    out = tmp_path / "bench.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--device", "cpu", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_text().strip() == done.stdout.strip()
    assert "torch threads 1" in done.stdout and "matmul peak" in done.stdout

    header, rows = _table(done.stdout, "Meta-training step")
    assert tuple(header) == bench.COLUMNS
    expected = {(s.label, algo, simt, engine) for s in bench.settings(True, torch.device("cpu"))
                for algo, simt, engine in itertools.product(s.algos, ("no", "yes"), bench.CPU_ENGINES)}
    assert {tuple(row[:4]) for row in rows} == expected and len(rows) == len(expected)
    for row in rows:
        values = dict(zip(header, row))
        for column in ("ms/step", "ops/step", "GFLOP/step", "GFLOP/s", "% matmul peak", "vs official"):
            assert _number(values[column]) > 0, (row, column)
        assert _number(values["peak MB"]) >= 0
        if values["engine"] == "official":
            assert values["vs official"] == "1.00×"

    header, rows = _table(done.stdout, "Test-time evaluation")
    assert len(rows) == sum(len(s.algos) for s in bench.settings(True, torch.device("cpu")))
    assert all(_number(cell) > 0 for row in rows for cell in row[3:])
    assert header[-3:] == ["batched vs one at a time", "GFLOP/task", "batched % matmul peak"]
    for row in rows:
        values = dict(zip(header, row))
        one, batched = (_number(values[f"{kind} s/{bench.EVAL_TASKS}"]) for kind in ("one at a time", "batched"))
        assert _number(values["batched vs one at a time"]) == pytest.approx(one / batched, rel=0.05)

    header, rows = _table(done.stdout, "Task sampling")
    assert header[-3:] == ["TaskSampler tasks/s", "PNG decode tasks/s", "ratio"] and len(rows) == 2
    assert all(_number(cell) > 0 for row in rows for cell in row[-3:])


def _tasks(count: int = 2, shots: int = 2, queries: int = 2) -> list[Task]:
    g = torch.Generator().manual_seed(0)
    labels = lambda n: torch.arange(WAYS).repeat_interleave(n)  # noqa: E731
    images = lambda n: torch.rand(WAYS * n, 1, 16, 16, generator=g, dtype=F64)  # noqa: E731
    return [Task(images(shots), labels(shots), images(queries), labels(queries)) for _ in range(count)]


def _model(algo: str, backbone: str):
    torch.manual_seed(0)
    out = WAYS if algo == "maml" else None
    if backbone == "conv4":
        return Conv4(1, 16, out, hidden=4, transductive_bn=out is not None).to(F64)
    return ResNet12(1, 16, out, widths=(2, 2, 2, 2), transductive_bn=out is not None).to(F64)


def _official_compat() -> dict:
    """What `compat=official` sets for ProtoNet, read from the composed config (not restated here)."""
    cfg = make_cfg("algo=protonet", "compat=official")
    return {"meta_batch": cfg.algo.meta_batch, "per_task_distillation": cfg.compat.protonet_kl}


@pytest.mark.parametrize("simt", [False, True], ids=["plain", "simt"])
@pytest.mark.parametrize("algo, backbone", [("maml", "conv4"), ("maml", "resnet12"), ("protonet", "conv4")])
def test_official_baseline_gives_our_meta_gradient(algo, backbone, simt):
    """Float64: the official-style baseline and our learner agree on the meta-gradient. MAML: the per-task
    loop (meta_forward on an OrderedDict of parameters, per-task backward) against our loop engine (params
    dict, one backward of the mean). ProtoNet: the one-pass meta-batch (BN statistics shared by its tasks, KL
    summed over a task's queries, one backward) against our ProtoNet built as `compat=official` builds it; the
    BN running statistics, updated once per pass, agree too (student and target)."""
    model = _model(algo, backbone)
    momentum = {"eta": 0.9, "lam": 0.5, "temp": 4.0} if simt else None
    per_task_distillation = "mean"
    if algo == "maml":
        learner = GradientLearner(model, inner_lr=0.1, inner_steps=2, engine="loop")
        official = OfficialMAML(copy.deepcopy(model), inner_lr=0.1, steps=2, eval_steps=2, momentum=momentum)
    else:
        compat = _official_compat()
        assert compat == {"meta_batch": "shared", "per_task_distillation": "sum"}
        per_task_distillation = compat["per_task_distillation"]
        learner = ProtoNet(model, train_ways=None, meta_batch=compat["meta_batch"])
        official = OfficialProtoNet(copy.deepcopy(model), momentum=momentum, ways=WAYS)
    target = None
    if simt:  # a target that differs from the student (else the distillation term has no gradient)
        target = MomentumTarget(learner.meta_parameters(), learner.momentum_keys, learner.momentum_buffers(),
                                eta=0.9, lam=0.5, temp=4.0, per_task_distillation=per_task_distillation)
        theirs = dict(official.momentum_model.named_parameters())
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key in target.keys:
                noise = 0.05 * torch.randn(target.params[key].shape, generator=g, dtype=F64)
                target.params[key].add_(noise)
                theirs[key].add_(noise)

    tasks = _tasks()
    loss, stats = meta_batch_loss(learner, target, tasks)
    ours = torch.autograd.grad(loss, list(learner.meta_parameters().values()))
    official.accumulate(MetaBatch.stack(tasks))  # the loader's stacked tensors (MAML runs them task by task)
    baseline = [p.grad for p in official.model.parameters()]

    flat = lambda grads: torch.cat([g.flatten() for g in grads])  # noqa: E731
    reference = flat(ours)
    assert reference.norm() > 0
    assert ((flat(baseline) - reference).norm() / reference.norm()).item() <= 1e-9
    if simt:
        assert stats["distill_loss"] > 0
    if algo == "protonet":
        pairs = [(dict(learner.model.named_buffers()), dict(official.model.named_buffers()))]
        if simt:
            pairs.append((target.params, dict(official.momentum_model.named_buffers())))
        for mine, baseline_buffers in pairs:
            assert baseline_buffers["features.layer1.norm.num_batches_tracked"] == 2  # support pass, query pass
            for name, value in baseline_buffers.items():
                assert torch.allclose(mine[name], value, rtol=1e-12, atol=1e-12), name


def test_official_protonet_is_not_our_default_protonet():
    """The baseline's one pass and summed KL are the released code's, not our default (compat=paper): on the
    same tasks the meta-gradients differ, so the benchmark's ProtoNet rows time two different batchings."""
    model = _model("protonet", "conv4")
    learner = ProtoNet(model, train_ways=None)  # meta_batch=per_task, the default
    official = OfficialProtoNet(copy.deepcopy(model), ways=WAYS)
    tasks = _tasks()
    loss, _ = meta_batch_loss(learner, None, tasks)
    ours = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(learner.meta_parameters().values()))])
    official.accumulate(tasks)
    theirs = torch.cat([p.grad.flatten() for p in official.model.parameters()])
    assert ((theirs - ours).norm() / ours.norm()).item() > 1e-3


@pytest.mark.parametrize("algo", bench.ALGOS)
def test_official_rows_take_decoded_meta_batches_of_our_rows_episode_shapes(algo, monkeypatch):
    """The official-style step is handed stacked float tensors decoded beforehand (no PNG in the timed step), in
    the episode shapes our engines' rows sample: 5-way for ProtoNet too (algo.train_ways=null)."""
    setting = bench.QUICK[0]
    cfg = bench.compose_config(setting, algo, True, torch.device("cpu"), 1)
    exp = bench.build(cfg, "loop")
    split = exp.dataset.split("train")
    ours = split.sampler(setting.ways, setting.shots, setting.queries, seed=cfg.seed).sample()
    pool = bench.official_pool(setting, PngImages(split.images, split.offsets), seed=cfg.seed)
    assert len(pool) == bench.OFFICIAL_POOL
    for batch in pool:
        assert isinstance(batch, MetaBatch) and len(batch) == setting.meta_batch
        assert batch.support_x.shape[1:] == ours.support_x.shape and batch.query_x.shape[1:] == ours.query_x.shape
        assert batch.support_x.dtype == ours.support_x.dtype == torch.float32
        assert torch.equal(batch.support_y[0], ours.support_y) and torch.equal(batch.query_y[0], ours.query_y)
    if algo == "protonet":
        assert exp.learner.train_ways is None and not exp.learner.shares_batch_statistics  # our default engine
        assert setting.ways == 5
    step = bench.official_step(exp, cfg, setting, algo, PngImages(split.images, split.offsets))
    calls = []
    original = PngImages.__getitem__
    monkeypatch.setattr(PngImages, "__getitem__", lambda self, index: calls.append(index) or original(self, index))
    step()
    assert calls == []  # nothing decoded inside the step


@pytest.mark.parametrize("channels", [1, 3])
def test_png_episodes_decode_the_samplers_pixels(channels):
    """PNG -> PIL -> ToTensor gives bit for bit the floats our TaskSampler makes of the same uint8 images."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 4, channels, 20, 20), generator=g, dtype=torch.uint8)
    png = PngImages(images.flatten(0, 1), torch.arange(4) * 4)
    for index, image in enumerate(images.flatten(0, 1)):
        decoded = png[index]
        assert decoded.dtype == torch.float32 and decoded.shape == image.shape
        assert torch.equal(decoded, image.float().div_(255))  # TaskSampler's conversion


@pytest.mark.parametrize("count, batch, shares, batched_calls", [
    (10, 6, [3, 3, 2, 2], [10]),  # not two whole batches: four turns, the batched evaluation alone
    (10, 2, [3, 3, 2, 2], [3, 3, 2, 2]),  # it joins the turns
    (200, 100, [100, 100], [100, 100]),  # the CUDA defaults: two turns, so that it joins them
])
def test_evaluations_take_turns_so_that_a_slow_minute_slows_each_alike(count, batch, shares, batched_calls):
    calls = []
    make = lambda name: lambda n: calls.append((name, n))  # noqa: E731
    seconds = bench.interleaved_eval_seconds(make("one"), make("batched"), make("official"), count, batch,
                                             torch.device("cpu"))
    assert set(seconds) == {"one", "batched", "official"} and all(value >= 0 for value in seconds.values())
    turns = [name for name, _ in calls if name != "batched"]
    assert turns == ["one", "official"] * len(shares)  # alternating
    for name, expected in (("one", shares), ("official", shares), ("batched", batched_calls)):
        assert [n for who, n in calls if who == name] == expected


def test_targets_are_computed_from_the_rows_and_say_when_they_are_missed():
    key = {"setting": "conv4 28x28x1 5w1s", "algo": "maml", "SiMT": "yes"}
    steps = [{**key, "engine": "loop", "ms/step": 90.0, "peak MB": 100.0, "vs official": 1.2},
             {**key, "engine": "batched", "ms/step": 20.0, "peak MB": 250.0, "vs official": 5.4},
             {**key, "engine": "batched halves", "ms/step": 36.0, "peak MB": 150.0, "vs official": 3.0}]
    evals = [{f"one at a time s/{bench.EVAL_TASKS}": 60.0, f"batched s/{bench.EVAL_TASKS}": 10.0}]
    sampling = [{"ratio": 40.0}, {"ratio": 9.0}]
    found = {row["target"]: row for row in bench.targets(torch.device("cuda"), steps, evals, sampling)}
    speed = found["batched vs loop speed, Conv4 5w1s MAML+SiMT"]
    assert speed["measured"] == "4.5" and speed["met"] == "yes"
    memory = found["batched / loop peak memory, same row"]
    assert memory["measured"] == "2.5" and memory["met"] == "NO"
    assert found["batched halves / loop peak memory, same row"]["met"] == "yes"  # 1.5x
    assert found["batched halves vs loop speed, same row"]["measured"] == "2.5"
    assert found["batched vs one-at-a-time evaluation, slowest row"]["measured"] == "6"
    assert found["TaskSampler vs per-image PNG decode, slowest row"]["met"] == "NO"  # 9x < 10x
    cpu = bench.targets(torch.device("cpu"), steps, evals, sampling)
    assert cpu[0]["measured"] == "1.2" and cpu[0]["met"] == "yes"
    assert cpu[1]["target"].startswith("loop with glibc's malloc defaults") and cpu[1]["met"] == "n/a"
    alone = bench.targets(torch.device("cpu"), [*steps, {**steps[0], "engine": "loop glibc", "vs official": 0.95}],
                          evals, sampling)[1]
    assert (alone["measured"], alone["goal"], alone["met"]) == ("0.95", "(for information)", "n/a")
    almost = [{**steps[0], "vs official": 0.9984}]
    assert bench.targets(torch.device("cpu"), almost, evals, sampling)[0]["measured"] == "0.998"
    missing = bench.targets(torch.device("cuda"), [], [], [])
    assert all(row["met"] == "n/a" for row in missing)


def test_a_setting_that_fails_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    """An out-of-memory error in one setting (e.g. ResNet-12 on a small GPU) must not lose the other tables."""
    measured = []

    def step_rows(setting, device, args, peak_flops):
        if setting.image_size == 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.50 GiB\nmore detail")
        measured.append(setting.label)
        return []

    monkeypatch.setattr(bench, "step_rows", step_rows)
    monkeypatch.setattr(bench, "eval_rows", lambda setting, device, args, peak_flops: [])
    monkeypatch.setattr(bench, "sampling_rows", lambda args: [])
    monkeypatch.setattr(bench, "matmul_peak_flops", lambda device, quick: (1e9, 8))
    out = tmp_path / "bench.md"
    assert bench.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)]) == 1
    assert measured == ["conv4 28x28x1 5w1s"]
    text = out.read_text()
    assert "## Settings that failed" in text
    assert "- conv4 32x32x3 5w1s: OutOfMemoryError: CUDA out of memory. Tried to allocate 13.50 GiB\n" in text


@pytest.mark.slow
def test_gpu_script_rows_mode_runs_the_chosen_rows_and_writes_their_table(tmp_path):
    """`bash benchmarks/gpu.sh rows` (a GPU session's ResNet-12 acceptance runs), here on the CPU with the
    kanji_pose rows: no nvidia-smi, no CUDA, and still the table."""
    from tests.conftest import child_env
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "rows"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=child_env(OUT=str(tmp_path), ROWS_ONLY="kanji_pose"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (table,) = tmp_path.glob("*-cuda-experiment-rows.md")
    assert "2 of 2 rows ran and gave a finite objective." in table.read_text()
    assert "| kanji_pose_maml | no | cpu |" in table.read_text()


@pytest.mark.slow
def test_gpu_script_reports_the_benchmarks_own_exit_status(tmp_path):
    """gpu.sh pipes the benchmark through tee and tail (pipefail): its status must be the benchmark's (2: no CUDA
    on this machine), not tail's 0, or a failed or timed-out benchmark would pass for a finished one."""
    from tests.conftest import child_env
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=child_env(OUT=str(tmp_path), TEST_TIMEOUT="1"))
    assert "benchmark exit 2" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.returncode != 0
