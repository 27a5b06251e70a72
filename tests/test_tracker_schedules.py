"""Classic EMAs tracked live by PostHocEMA(schedules=...): each library's updates, names, snapshots, resume."""

from __future__ import annotations

import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_schedules import (
    WARMUP_IDS,
    WARMUP_SETTINGS,
    assert_same,
    averaged_model_ema,
    composer_ema,
    ema_pytorch_ema,
    linear,
    load,
    params,
    super_gradients_ema,
    timm_v2_ema,
    trajectory,
)

from posthoc_ema import PostHocEMA, list_snapshots, synthesize
from posthoc_ema.folders import describe
from posthoc_ema.schedules import (
    Constant,
    ExpWarmup,
    HalfLife,
    PowerFunction,
    Schedule,
    Threshold,
    Warmup,
    from_metadata,
    to_metadata,
)
from posthoc_ema.snapshots import read_info


def tracked(schedule: Schedule, states: list[dict[str, torch.Tensor]], **kwargs) -> list[dict[str, torch.Tensor]]:
    """The EMA the real tracker keeps of ``schedule``, read after each update of ``states[1:]``."""
    model = linear(states[0])
    emas = PostHocEMA(model, sigma_rels=(), schedules={"s": schedule}, **kwargs)
    out = []
    for state in states[1:]:
        load(model, state)
        emas.update()
        out.append(emas.ema_state_dict("s"))
    return out


# -- the same numbers as each library, update for update, in float32 -----------------------------------------


@pytest.mark.parametrize("settings_", WARMUP_SETTINGS, ids=WARMUP_IDS)
def test_warmup_tracks_as_ema_pytorch(settings_):
    sched = Warmup(**settings_)
    states = trajectory(300)
    assert_same(tracked(sched, states), ema_pytorch_ema(sched, states))


def test_constant_tracks_as_timm_model_ema_v2():
    states = trajectory(300)
    assert_same(tracked(Constant(0.98), states), timm_v2_ema(0.98, states))


def test_constant_tracks_as_torch_averaged_model_from_start_1():
    states = trajectory(200)
    theirs = averaged_model_ema(0.97, states)
    # AveragedModel copies at its first update_parameters: Constant(beta, start=1).
    assert_same(tracked(Constant(0.97, start=1), states), theirs)
    with pytest.raises(AssertionError):  # Constant(beta) keeps the copy made at creation instead
        assert_same(tracked(Constant(0.97), states), theirs)


@pytest.mark.parametrize(("half_life", "interval", "ema_start"), [(20, 1, 0), (30, 4, 0), (25, 3, 10)])
def test_half_life_tracks_as_composer(half_life, interval, ema_start):
    states = trajectory(200)
    ours = tracked(HalfLife(half_life, update_interval=interval, start=max(ema_start, 1)), states)
    assert_same(ours, composer_ema(half_life, interval, ema_start, states))


def test_threshold_tracks_as_super_gradients():
    # ema_decay_schedules.py (Deci-AI/super-gradients), ThresholdDecay: min(decay, (1 + step) / (10 + step)).
    states = trajectory(200)
    theirs = super_gradients_ema(states, lambda step, total: min(0.99, (1 + step) / (10 + step)))
    assert_same(tracked(Threshold(0.99), states), theirs)


def test_exp_warmup_tracks_as_super_gradients():
    # ema_decay_schedules.py, ExpDecay(beta): decay * (1 - exp(-(step / total_steps) * beta)).
    states = trajectory(200)
    theirs = super_gradients_ema(states, lambda step, total: 0.995 * (1 - math.exp(-(step / total) * 15)))
    assert_same(tracked(ExpWarmup(0.995, rate=15, total_steps=200), states), theirs)


# -- exactly the weights of schedules.weights, at any cadence ---------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [Constant(0.8), Constant(0.7, start=6), HalfLife(3.0, start=4), Warmup(power=1.0, update_after_step=3)],
    ids=repr,
)
@pytest.mark.parametrize("update_every", [1, 3])
def test_the_tracked_ema_is_the_weighted_sum_of_schedules_weights(schedule, update_every):
    # float64 trajectory and EMAs: the tracker's recursion against the closed weights of schedules.py.
    steps = 20
    generator = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(3, 2).double()
    history = [torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()]
    emas = PostHocEMA(model, sigma_rels=(), schedules={"s": schedule}, update_every=update_every)
    emas.to(dtype=torch.float64)
    update_steps = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
        history.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
        emas.update()
        if emas.ema_step == step:
            update_steps.append(step)
    w = schedule.weights(update_steps, update_steps[-1])
    thetas = torch.stack([history[0], *(history[t] for t in update_steps)]).numpy()
    expected = w @ thetas
    ema = emas.ema_state_dict("s")
    got = torch.cat([ema["weight"].reshape(-1), ema["bias"].reshape(-1)]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 5), min_size=1, max_size=12),
    beta=st.floats(0.0, 0.95),
    half_life=st.floats(0.5, 20.0),
    start=st.integers(0, 10),
)
def test_irregular_steps_give_exactly_schedules_weights(gaps, beta, half_life, start):
    steps = np.cumsum(gaps)
    model = torch.nn.Linear(2, 1).double()
    schedules = {"c": Constant(beta, start=start), "h": HalfLife(half_life, start=start)}
    emas = PostHocEMA(model, sigma_rels=(), schedules=schedules).to(dtype=torch.float64)
    history = [model.weight.detach().clone()]
    generator = torch.Generator().manual_seed(int(steps[-1]))
    for step in steps:
        with torch.no_grad():
            model.weight.add_(torch.randn(model.weight.shape, generator=generator, dtype=torch.float64))
        history.append(model.weight.detach().clone())
        emas.update(step=int(step))
    thetas = torch.stack(history).reshape(len(history), -1).numpy()
    for name, schedule in schedules.items():
        expected = schedule.weights(steps, steps[-1]) @ thetas
        got = emas.ema_state_dict(name)["weight"].reshape(-1).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_power_function_emas_are_unchanged_by_schedules_beside_them():
    states = trajectory(50)
    alone_model, both_model = linear(states[0]), linear(states[0])
    alone = PostHocEMA(alone_model, sigma_rels=(0.05, 0.1))
    both = PostHocEMA(both_model, sigma_rels=(0.05, 0.1), schedules={"timm": Constant(0.99)})
    for state in states[1:]:
        load(alone_model, state)
        load(both_model, state)
        alone.update()
        both.update()
    for sigma_rel in (0.05, 0.1):
        for k, v in alone.ema_state_dict(sigma_rel).items():
            assert torch.equal(v, both.ema_state_dict(sigma_rel)[k])


# -- names ----------------------------------------------------------------------------------------------


@pytest.fixture
def trained():
    states = trajectory(30)
    model = linear(states[0])
    emas = PostHocEMA(model, sigma_rels=(0.05,), schedules={"timm": Constant(0.9), "warm": Warmup(power=1.0)})
    for state in states[1:]:
        load(model, state)
        emas.update()
    return model, emas


def test_names_work_wherever_a_sigma_rel_does(trained):
    model, emas = trained
    assert emas.names == ("timm", "warm")
    assert emas.schedules == {"timm": Constant(0.9), "warm": Warmup(power=1.0)}
    timm = emas.ema_state_dict("timm")
    assert not torch.equal(timm["weight"], emas.ema_state_dict("warm")["weight"])
    assert not torch.equal(timm["weight"], emas.ema_state_dict(0.05)["weight"])
    assert torch.equal(emas.ema_state_dict("0.05")["weight"], emas.ema_state_dict(0.05)["weight"])
    own = params(model)
    with emas.swapped(model, "timm"):
        assert torch.equal(model.weight.detach(), timm["weight"])
    assert torch.equal(model.weight.detach(), own["weight"])
    target = copy.deepcopy(model)
    emas.copy_to(target, "timm")
    assert torch.equal(target.weight.detach(), timm["weight"])


@pytest.mark.parametrize(
    ("schedules", "message"),
    [
        ({"a b": Constant(0.9)}, r"schedule name 'a b' is not valid: use a letter or digit"),
        ({"": Constant(0.9)}, r"schedule name '' is not valid"),
        ({"../x": Constant(0.9)}, r"schedule name '../x' is not valid"),
        ({"0.05": Constant(0.9)}, r"schedule name '0.05' is a number, which would be read as a sigma_rel"),
        ({"inf": Constant(0.9)}, r"schedule name 'inf' is a number"),
        ({"Timm": Constant(0.9), "timm": Constant(0.8)}, r"'Timm' and 'timm' differ only in case"),
        ({"p": PowerFunction(sigma_rel=0.1)}, r"schedules\['p'\] is a power function; track it with sigma_rels"),
        ({"c": 0.9}, r"schedules\['c'\]=0.9 is not a schedule"),
    ],
)
def test_bad_schedules_are_refused(schedules, message):
    with pytest.raises(ValueError, match=message):
        PostHocEMA(torch.nn.Linear(2, 1), sigma_rels=(), schedules=schedules)


def test_no_ema_at_all_is_refused_and_unknown_names_are_named(trained):
    with pytest.raises(ValueError, match=r"sigma_rels is empty and no schedules are given"):
        PostHocEMA(torch.nn.Linear(2, 1), sigma_rels=())
    with pytest.raises(ValueError, match=r"sigma_rels is empty and no schedules are given"):
        PostHocEMA(torch.nn.Linear(2, 1), sigma_rels=(), schedules={})
    model, emas = trained
    with pytest.raises(ValueError, match=r"sigma_rel='tim' is not a number, nor .*tracked: 0.05, 'timm', 'warm'"):
        emas.ema_state_dict("tim")
    with pytest.raises(ValueError, match=r"sigma_rel=0.1 is not tracked; tracked: 0.05, 'timm', 'warm'"):
        emas.copy_to(model, 0.1)


# -- functional_call ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_functional_call_equals_a_copied_model_and_leaves_the_model_alone(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)).to(dtype)
    emas = PostHocEMA(model, sigma_rels=(0.1,), schedules={"timm": Constant(0.5)})
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(8, 5, dtype=dtype))  # moves BatchNorm's running statistics and counter
        emas.update()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 5, dtype=dtype)
    for key in ("timm", 0.1):
        reference = copy.deepcopy(model)
        emas.copy_to(reference, key)
        expected = reference(x)
        got = emas.functional_call(model, key, (x,))
        assert got.dtype == dtype
        assert torch.equal(got, expected)
        assert not torch.equal(got, model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_functional_call_passes_kwargs_and_checks_the_model(trained):
    model, emas = trained
    x = torch.randn(3, 6)

    class Scaled(torch.nn.Linear):
        def forward(self, x, *, scale=1.0):  # type: ignore[override]
            return super().forward(x) * scale

    scaled = Scaled(6, 4)
    scaled.load_state_dict(model.state_dict())
    with emas.swapped(scaled, "warm"):
        expected = scaled(x, scale=3.0)
    assert torch.equal(emas.functional_call(scaled, "warm", (x,), {"scale": 3.0}), expected)
    with pytest.raises(ValueError, match=r"the model lacks 2 tracked tensors"):
        emas.functional_call(torch.nn.Sequential(torch.nn.Linear(6, 4)), "warm", (x,))


def test_functional_call_through_a_wrapper(trained):
    model, emas = trained

    class Wrapper(torch.nn.Module):  # keys gain "module.", as with DistributedDataParallel
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    x = torch.randn(3, 6)
    with emas.swapped(model, "timm"):
        expected = model(x)
    assert torch.equal(emas.functional_call(Wrapper(model), "timm", x), expected)


# -- snapshots ------------------------------------------------------------------------------------------


def test_snapshots_of_classic_emas_record_their_schedule_and_are_left_out_of_synthesis(tmp_path):
    states = trajectory(20)
    model = linear(states[0])
    schedules = {"timm": Constant(0.9, start=2), "warm": Warmup(power=0.75)}
    with PostHocEMA(model, sigma_rels=(0.05, 0.1), schedules=schedules, snapshot_dir=tmp_path, snapshot_every=10) as e:
        for state in states[1:]:
            load(model, state)
            e.update()
        live = {name: e.ema_state_dict(name) for name in (*schedules, 0.1)}
    path = tmp_path / "phema-000000000020-timm.safetensors"
    info = read_info(path)
    assert info is not None and info.is_classic and info.name == "timm" and info.step == 20
    assert math.isnan(info.sigma_rel) and math.isnan(info.gamma)
    assert from_metadata(info.schedule) == schedules["timm"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(path)["weight"], live["timm"]["weight"])
    power = list_snapshots(tmp_path)
    assert [(i.step, i.sigma_rel) for i in power] == [(10, 0.05), (10, 0.1), (20, 0.05), (20, 0.1)]
    every = list_snapshots(tmp_path, include_classic=True)
    assert [(i.step, i.name) for i in every] == [
        (10, None),
        (10, None),
        (10, "timm"),
        (10, "warm"),
        (20, None),
        (20, None),
        (20, "timm"),
        (20, "warm"),
    ]
    # The classic snapshots join synthesis as basis profiles: the tracked sigma_rel still comes back.
    torch.testing.assert_close(synthesize(tmp_path, 0.1)["weight"], live[0.1]["weight"], rtol=1e-4, atol=1e-5)
    summary = describe(tmp_path)
    assert summary["snapshots"] == 4
    assert {k: summary["classic"][k] for k in ("snapshots", "names")} == {
        "snapshots": 4,
        "names": {"timm": 2, "warm": 2},
    }
    assert [f["name"] for f in summary["classic"]["files"]] == ["timm", "warm", "timm", "warm"]
    assert summary["oddities"] == []


def test_classic_snapshots_of_another_run_count_as_that_run(tmp_path):
    from posthoc_ema import SnapshotError

    model = torch.nn.Linear(2, 1)
    with PostHocEMA(model, sigma_rels=(), schedules={"c": Constant(0.9)}, snapshot_dir=tmp_path) as first:
        first.update()
    second = PostHocEMA(model, sigma_rels=(0.1,), snapshot_dir=tmp_path, final_snapshot=False)
    second.update()
    with pytest.raises(SnapshotError, match=r"holds 1 snapshot of another training run \(e.g. phema-000000000001-c"):
        second.snapshot()


def test_snapshot_metadata_of_a_classic_ema(tmp_path):
    model = torch.nn.Linear(2, 1)
    with PostHocEMA(model, sigma_rels=(), schedules={"h": HalfLife(50.0)}, snapshot_dir=tmp_path) as emas:
        emas.update()
    from posthoc_ema.files import read_header

    meta, _ = read_header(tmp_path / "phema-000000000001-h.safetensors")
    assert meta["format_version"] == "2"  # an older reader asks for an upgrade instead of misreading it
    assert "sigma_rel" not in meta and "gamma" not in meta
    assert json.loads(meta["schedule"]) == {
        "class": "HalfLife",
        "half_life": 50.0,
        "update_interval": 1.0,
        "start": 0.0,
    }
    assert meta["name"] == "h"


# -- resume ---------------------------------------------------------------------------------------------


def test_resume_is_exact_for_the_schedules_emas():
    states = trajectory(40)
    schedules = {"timm": Constant(0.9), "warm": Warmup(power=1.0, update_after_step=2)}
    model = linear(states[0])
    straight = PostHocEMA(model, sigma_rels=(0.1,), schedules=schedules)
    for state in states[1:21]:
        load(model, state)
        straight.update()
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = linear(states[20])
    resumed = PostHocEMA(resumed_model, sigma_rels=(0.1,), schedules=dict(reversed(schedules.items())))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for state in states[21:]:
        load(model, state)
        load(resumed_model, state)
        straight.update()
        resumed.update()
    for key in ("timm", "warm", 0.1):
        for k, v in straight.ema_state_dict(key).items():
            assert torch.equal(v, resumed.ema_state_dict(key)[k]), (key, k)


@pytest.mark.parametrize(
    ("schedules", "message"),
    [
        ({"timm": Constant(0.99)}, r"schedules differ .* at 'timm': saved \{.*0\.9,.*\}, here \{.*0\.99,"),
        ({}, r"schedules differ .* at 'timm': saved \{.*\}, here nothing"),
        ({"timm": Constant(0.9), "x": Threshold(0.9)}, r"at 'x': saved nothing, here \{"),
    ],
)
def test_resume_refuses_other_schedules(schedules, message):
    model = torch.nn.Linear(2, 1)
    saved = PostHocEMA(model, sigma_rels=(0.1,), schedules={"timm": Constant(0.9)})
    saved.update()
    with pytest.raises(ValueError, match=message):
        PostHocEMA(model, sigma_rels=(0.1,), schedules=schedules).load_state_dict(saved.state_dict())


# -- the metadata spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [
        Constant(0.9998, start=100),
        HalfLife(2000.0, update_interval=4, start=1),
        Warmup(inv_gamma=1.5, power=0.75, min_beta=0.1, max_beta=0.999, update_after_step=10),
        Threshold(0.9999),
        ExpWarmup(0.9998, rate=15, total_steps=1e6),
        PowerFunction(sigma_rel=0.05),
    ],
    ids=repr,
)
def test_metadata_spec_round_trips(schedule):
    spec = to_metadata(schedule)
    assert json.loads(spec)["class"] == type(schedule).__name__
    assert from_metadata(spec) == schedule


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{", r"schedule spec '\{' is not JSON"),
        ("[1]", r'is not a JSON object with a "class" entry'),
        ('{"class": "Cosine"}', r"names the class 'Cosine'; known: Constant, ExpWarmup, HalfLife"),
        ('{"class": "Constant", "decay": 0.9}', r"has arguments Constant does not take"),
        ('{"class": "Constant", "beta": 1.5}', r"beta=1.5 is outside \[0, 1\)"),
    ],
)
def test_bad_metadata_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        from_metadata(spec)
