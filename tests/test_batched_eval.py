"""Batched test-time evaluation (evaluate(batch_size > 1), engines.batched_eval_outputs) against the
per-episode path: the same outputs (float64, rtol 1e-9) and the same per-episode scores, for every learner,
student and momentum target, any configured engine, a last chunk smaller than the others, and regression.
Tiny widths and 16x16 images keep the file fast on two CPU cores.
"""
import pytest
import torch
import torch.nn.functional as F

from simt.algorithms import GradientLearner, MetaSGD, ProtoNet
from simt.algorithms.engines import batched_eval_outputs
from simt.data.regression import mse
from simt.data.tasks import Task
from simt.evaluator import ACCURACY, Metric, evaluate
from simt.models import Conv4, ConvRegressor, ResNet12
from simt.models.batch_norm import ExactBatchNorm2d
from simt.momentum import MomentumTarget

F64 = torch.float64
CPU = torch.device("cpu")
WAYS, EPISODES, CHUNK = 3, 7, 3  # 7 episodes in chunks of 3: the last chunk holds one
ALGOS = {
    "maml": (GradientLearner, {}),
    "anil": (GradientLearner, {"adapt_scope": "head"}),
    "metasgd": (MetaSGD, {}),
    "protonet": (ProtoNet, {}),
}


def _episodes(count=EPISODES, queries=2, seed=0) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.rand(WAYS * n, 1, 16, 16, generator=g, dtype=F64)  # noqa: E731
    y = lambda n: torch.arange(WAYS).repeat_interleave(n)  # noqa: E731
    return [Task(x(2), y(2), x(queries), y(queries)) for _ in range(count)]


def _learner(algo: str, backbone: str = "conv4", engine: str = "loop"):
    """Dropout in the network (p=0.2): evaluation must switch it off, batched or not."""
    cls, kwargs = ALGOS[algo]
    embedding = cls is ProtoNet
    torch.manual_seed(0)
    out = None if embedding else WAYS
    if backbone == "conv4":
        model = Conv4(1, 16, out, hidden=4, drop_p=0.2, transductive_bn=not embedding)
    else:  # ResNet-12's meta-BatchNorm: its affine parameters are adapted in the inner loop
        model = ResNet12(1, 16, out, widths=(2, 2, 2, 2), drop_p=0.2, transductive_bn=not embedding)
    model = model.to(F64)
    if embedding:  # running statistics that are not the initial 0 and 1, so that eval mode uses something
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("running_mean"):
                    buffer.copy_(0.2 * torch.randn(buffer.shape, generator=g, dtype=F64))
                elif name.endswith("running_var"):
                    buffer.copy_(0.5 + torch.rand(buffer.shape, generator=g, dtype=F64))
        return cls(model, engine=engine, **kwargs)
    return cls(model, engine=engine, inner_lr=0.1, inner_steps=2, eval_inner_steps=3, **kwargs)


def _models(learner) -> dict:
    """SiMT's two evaluated networks: the student and a momentum target that differs from it."""
    target = MomentumTarget(learner.meta_parameters(), learner.momentum_keys, learner.momentum_buffers(),
                            eta=0.9, lam=0.5, temp=4.0)
    g = torch.Generator().manual_seed(1)
    for key in target.keys:
        target.params[key].add_(0.05 * torch.randn(target.params[key].shape, generator=g, dtype=F64))
    return {"student": learner.meta_parameters(), "target": target.params}


def _state(learner, models) -> dict[str, torch.Tensor]:
    """Everything evaluation must leave alone: the model's parameters and buffers, the target's entries."""
    state = {f"model.{k}": v.detach().clone() for k, v in learner.model.state_dict().items()}
    state.update({f"{name}.{k}": v.detach().clone() for name, params in models.items() for k, v in params.items()})
    return state


ACC = ACCURACY  # with `values`: a batched chunk is scored in one read
LOSS = Metric(lambda out, y: F.cross_entropy(out, y).item(), "loss", higher_is_better=False)  # tells episodes apart


def _assert_batched_equals_per_episode(learner, models, episodes, metrics=(ACC, LOSS)) -> dict[str, list]:
    """Outputs chunk by chunk, then evaluate()'s scores (exact for accuracy, to rounding for continuous
    scores), and that nothing evaluation must not touch has changed. Returns each model's outputs."""
    before = _state(learner, models)
    outputs = {}
    for name, params in models.items():
        expected = [learner.eval_outputs(params, task) for task in episodes]
        got = [out for start in range(0, len(episodes), CHUNK)
               for out in batched_eval_outputs(learner, params, episodes[start:start + CHUNK])]
        assert len(got) == len(expected)
        for out, ref in zip(got, expected):
            assert not out.requires_grad
            torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
        outputs[name] = got
    for metric in metrics:
        per_episode = evaluate(learner, models, episodes, CPU, metric)
        batched = evaluate(learner, models, episodes, CPU, metric, batch_size=CHUNK)
        assert list(batched) == list(per_episode) and all(len(v) == len(episodes) for v in batched.values())
        if metric is ACC:  # the very same numbers
            assert batched == per_episode
        else:  # in episode order, equal up to float64 rounding
            for name, values in per_episode.items():
                assert batched[name] == pytest.approx(values, rel=1e-10, abs=1e-14)
                assert len(set(values)) == len(values)  # every episode scores differently: order matters
    after = _state(learner, models)  # ProtoNet's running statistics included: read, never updated
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items()), [k for k, v in before.items()
                                                                      if not torch.equal(after[k], v)]
    assert not any(isinstance(m, ExactBatchNorm2d) for m in learner.model.modules())  # swapped back
    assert learner.model.training  # ProtoNet's eval mode was undone
    return outputs


@pytest.mark.parametrize("algo, backbone", [("maml", "conv4"), ("maml", "resnet12"), ("anil", "conv4"),
                                            ("metasgd", "conv4"), ("protonet", "conv4")])
def test_batched_evaluation_equals_per_episode(algo, backbone):
    learner = _learner(algo, backbone)
    outputs = _assert_batched_equals_per_episode(learner, _models(learner), _episodes())
    assert not torch.allclose(outputs["student"][0], outputs["target"][0])  # two really different networks


@pytest.mark.parametrize("engine", ["batched", "higher"])
def test_batched_evaluation_whatever_the_learners_engine(engine):
    """The batched path adapts with autograd's SGD step (sgd_step) whatever `algo.engine` says (`higher`
    is not run on stacked tasks), and leaves the learner's engine as it was."""
    learner = _learner("maml", engine=engine)
    _assert_batched_equals_per_episode(learner, _models(learner), _episodes())
    assert learner.engine == engine


def test_batched_evaluation_of_a_regressor_with_mse():
    """Float targets, different in every episode (they enter vmap batched), scored by MSE (lower is better)."""
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.rand(n, 1, 16, 16, generator=g, dtype=F64)  # noqa: E731
    targets = lambda n: torch.rand(n, 2, generator=g, dtype=F64) * 2 - 1  # noqa: E731  (cos, sin)-like
    episodes = [Task(images(4), targets(4), images(5), targets(5)) for _ in range(EPISODES)]
    torch.manual_seed(0)
    model = ConvRegressor(1, 16, out_features=2, hidden=4, output_activation="tanh").to(F64)
    learner = GradientLearner(model, inner_lr=0.1, inner_steps=2, eval_inner_steps=3, loss_fn=F.mse_loss,
                              engine="loop")
    _assert_batched_equals_per_episode(learner, _models(learner), episodes, [Metric(mse, "mse", False)])


def test_episodes_of_different_shapes_in_one_chunk_are_a_one_line_error():
    learner = _learner("maml")
    episodes = [*_episodes(count=2, queries=2), _episodes(count=1, queries=3)[0]]
    with pytest.raises(ValueError) as error:
        evaluate(learner, _models(learner), episodes, CPU, batch_size=3)
    message = str(error.value)
    assert "\n" not in message and message.startswith("trainer.eval_batch=3: the episodes of a chunk must have")
    assert "(6, 1, 16, 16)" in message and "(9, 1, 16, 16)" in message  # the query shapes that differ
    with pytest.raises(ValueError, match="trainer.eval_batch=0: expected a positive number"):
        evaluate(learner, _models(learner), episodes, CPU, batch_size=0)


def test_chunks_stay_within_the_largest_tensor_cudnn_takes(monkeypatch):
    """A chunk whose widest activation would exceed MAX_TENSOR_ELEMENTS (cuDNN's 32-bit indexing; an H100
    refused 100 Conv4-64 episodes of 84x84 images) is cut to the most episodes that fit; scores unchanged."""
    from simt import evaluator
    from simt.algorithms import engines

    learner = _learner("protonet")
    models, episodes = _models(learner), _episodes()
    widest = 4 * 16 * 16  # Conv4 (hidden 4) on 16x16 images: the first block's output per image
    assert evaluator.widest_activation(learner.model, episodes[0].query_x[:2]) == widest
    expected = evaluate(learner, models, episodes, CPU, LOSS)
    monkeypatch.setattr(evaluator, "MAX_TENSOR_ELEMENTS", 2 * WAYS * 2 * widest)  # two episodes of 6 images
    sizes = []
    batched = engines.batched_eval_outputs
    monkeypatch.setattr(engines, "batched_eval_outputs",
                        lambda learner, params, tasks: sizes.append(len(tasks)) or batched(learner, params, tasks))
    before = _state(learner, models)
    got = evaluate(learner, models, episodes, CPU, LOSS, batch_size=5)
    assert sizes == [2, 2, 2] * len(models)  # 7 episodes per model: 2+2+2, and the last one alone (unbatched)
    assert list(got) == list(expected) and all(got[k] == pytest.approx(v, rel=1e-10) for k, v in expected.items())
    assert all(torch.equal(_state(learner, models)[k], v) for k, v in before.items())  # the probe changed nothing


def test_measuring_the_widest_activation_leaves_every_layer_in_its_mode():
    """A training network with dropout switched off (set_dropout) keeps it off after the probe."""
    from simt.evaluator import widest_activation
    from simt.models import set_dropout

    model = Conv4(1, 16, WAYS, hidden=4, drop_p=0.5).train()
    set_dropout(model, False)
    modes = [m.training for m in model.modules()]
    assert widest_activation(model, torch.rand(2, 1, 16, 16)) == 4 * 16 * 16
    assert [m.training for m in model.modules()] == modes
