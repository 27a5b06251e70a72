"""PostHocEMA against an exact float64 power-function EMA written here from EDM2 eq. 127.

The reference recursion is ``ema = beta * ema + (1 - beta) * w`` with
``beta = (t_prev / t)**(gamma + 1)`` at every time ``t`` the EMA is applied,
in NumPy float64; the realised weight profile of that recursion is also checked
against the continuous profile's mass by quadrature.
"""

from __future__ import annotations

import copy
import io
import itertools
import re
import threading
from collections.abc import Sequence

import numpy as np
import pytest
import scipy.integrate
import torch
from helpers import reference_gamma
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from posthoc_ema import PostHocEMA, list_snapshots

# -- references ----------------------------------------------------------------------


def power_ema(values: Sequence[np.ndarray], times: Sequence[float], gamma: float) -> np.ndarray:
    """EDM2 eq. 127 applied at ``times`` to ``values``, in float64; the first update copies."""
    ema, prev = None, 0.0
    for t, w in zip(times, values, strict=True):
        beta = (prev / t) ** (gamma + 1)
        ema = np.array(w, dtype=np.float64) if ema is None else beta * ema + (1 - beta) * w
        prev = t
    assert ema is not None
    return ema


def exact_profile(times: Sequence[float], gamma: float) -> np.ndarray:
    """Weight of the value taken at each time t_i: (t_i^(g+1) - t_(i-1)^(g+1)) / T^(g+1), t_(-1) = 0."""
    ratio = np.asarray(times, dtype=np.float64) / times[-1]
    powered = np.concatenate([[0.0], ratio ** (gamma + 1)])
    return np.diff(powered)


def profile_mass(lo: float, hi: float, end: float, gamma: float) -> float:
    """Mass of f_T(t) = (gamma + 1) t^gamma / T^(gamma + 1) over (lo, hi], by quadrature."""
    value, _ = scipy.integrate.quad(
        lambda t: (gamma + 1) / end * (t / end) ** gamma, lo, hi, epsabs=1e-15, epsrel=1e-12, limit=200
    )
    return value


def applied_calls(n_calls: int, update_every: int, snapshot_every: int | None = None) -> list[int]:
    """The calls (1-based) at which the EMA is applied: every k-th, and every snapshot step."""
    return [
        c
        for c in range(1, n_calls + 1)
        if c % update_every == 0 or (snapshot_every is not None and c % snapshot_every == 0)
    ]


# -- models ------------------------------------------------------------------------------


class Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64, extra: bool = False) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 4, dtype=dtype)
        self.out = torch.nn.Linear(4, 2, bias=False, dtype=dtype)
        self.register_buffer("scale", torch.ones(2, dtype=dtype))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        if extra:
            self.head = torch.nn.Linear(2, 1, dtype=dtype)


@torch.no_grad()
def set_weights(model: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Put weights that depend only on ``seed`` into ``model``; returns them in float64."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            value = rng.normal(size=tuple(t.shape))
            t.copy_(torch.from_numpy(value))
            values[name] = t.double().numpy().copy()  # as rounded to the model's dtype
        else:
            t.fill_(seed)
            values[name] = t.numpy().copy()
    return values


class Probe(torch.nn.Module):
    """A float64 vector whose value at the i-th call is the unit vector e_i: its EMA is the weight profile."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

    @torch.no_grad()
    def show(self, i: int) -> None:
        self.x.zero_()
        self.x[i] = 1.0


def run_probe(tracker: PostHocEMA, probe: Probe, steps: Sequence[int] | None = None, n: int | None = None) -> None:
    for i in range(len(steps) if steps is not None else n):
        probe.show(i)
        tracker.update(step=None if steps is None else steps[i])


# -- the EMA against the float64 recursion ---------------------------------------------------


def check_against_recursion(n_calls: int, update_every: int, sigma_rels: Sequence[float], dtype=torch.float64) -> None:
    torch.manual_seed(0)
    model = Net(dtype)
    tracker = PostHocEMA(model, sigma_rels, update_every=update_every)
    history = []
    tol = {"rtol": 1e-12, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 2e-6}
    for call in range(1, n_calls + 1):
        history.append(set_weights(model, call))
        tracker.update()
        applied = applied_calls(call, update_every)
        assert tracker.step == call
        if not applied:
            continue
        assert tracker.ema_step == applied[-1]
        for sigma_rel in sigma_rels:
            ema = tracker.ema_state_dict(sigma_rel)
            for name, value in ema.items():
                if value.is_floating_point():
                    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                    # The tracker keeps the canonical sigma_rel (6 significant digits).
                    gamma = reference_gamma(float(f"{sigma_rel:.6g}"))
                    expected = power_ema([history[c - 1][name] for c in applied], applied, gamma)
                    np.testing.assert_allclose(value.double().numpy(), expected, **tol, err_msg=name)
                else:  # integer buffers are copied at each update
                    np.testing.assert_array_equal(value.numpy(), history[applied[-1] - 1][name])


@pytest.mark.parametrize("update_every", [1, 2, 3, 4])
@pytest.mark.parametrize("n_calls", range(1, 10))
def test_matches_float64_recursion_exhaustive(n_calls, update_every):
    check_against_recursion(n_calls, update_every, (0.05, 0.2))


@given(
    n_calls=st.integers(1, 60),
    update_every=st.integers(1, 10),
    sigma_rels=st.lists(st.floats(0.005, 0.28), min_size=1, max_size=3, unique_by=lambda s: f"{s:.6g}"),
)
@settings(max_examples=25, deadline=None)
def test_matches_float64_recursion_property(n_calls, update_every, sigma_rels):
    check_against_recursion(n_calls, update_every, sigma_rels)


@pytest.mark.parametrize("update_every", [1, 3])
def test_float32_model_matches_the_recursion(update_every):
    check_against_recursion(40, update_every, (0.05, 0.10), dtype=torch.float32)


# -- the one-hot probe: the realised profile is the power function's ----------------------------


@pytest.mark.parametrize("update_every", [1, 7, 100])
@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.25])
def test_one_hot_probe_realises_the_exact_profile(update_every, sigma_rel):
    n = 701
    probe = Probe(n)
    tracker = PostHocEMA(probe, sigma_rel, update_every=update_every)
    run_probe(tracker, probe, n=n)
    times = applied_calls(n, update_every)
    assert tracker.ema_step == times[-1]  # 700 for k = 7 and 100: call 701 is not applied yet
    gamma = reference_gamma(sigma_rel)
    expected = np.zeros(n)
    expected[np.array(times) - 1] = exact_profile(times, gamma)
    got = tracker.ema_state_dict(sigma_rel)["x"].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)
    assert got.sum() == pytest.approx(1.0, rel=1e-12)
    if update_every > 1:
        # Each value taken stands for the whole interval since the previous update: the
        # mass of the continuous profile there, not a distorted (per-call beta) profile.
        edges = [0, *times]
        mass = [profile_mass(lo, hi, times[-1], gamma) for lo, hi in itertools.pairwise(edges)]
        np.testing.assert_allclose(got[np.array(times) - 1], mass, rtol=1e-8, atol=1e-14)


def test_one_hot_probe_with_snapshots_between_updates(tmp_path, make_tracker):
    # update_every=7 and snapshot_every=50: the EMA is also applied at every snapshot step,
    # and each snapshot holds the exact profile of its own step.
    n, sigma_rel = 701, 0.10
    probe = Probe(n)
    tracker = make_tracker(
        probe, sigma_rel, update_every=7, snapshot_every=50, snapshot_dir=tmp_path, snapshot_dtype="float64"
    )
    run_probe(tracker, probe, n=n)
    tracker.flush()
    gamma = reference_gamma(sigma_rel)
    infos = list_snapshots(tmp_path)
    assert [info.step for info in infos] == list(range(50, 701, 50))
    for info in infos:
        times = applied_calls(info.step, 7, 50)
        expected = np.zeros(n)
        expected[np.array(times) - 1] = exact_profile(times, gamma)
        np.testing.assert_allclose(load_file(info.path)["x"].numpy(), expected, rtol=1e-10, atol=1e-15)
    # snapshot() brings the EMA up to the current step with the current value.
    tracker.snapshot()
    tracker.flush()
    times = [*applied_calls(n, 7, 50), 701]
    expected = np.zeros(n)
    expected[np.array(times) - 1] = exact_profile(times, gamma)
    np.testing.assert_allclose(tracker.ema_state_dict(sigma_rel)["x"].numpy(), expected, rtol=1e-10, atol=1e-15)
    assert list_snapshots(tmp_path)[-1].step == 701


def check_irregular_steps(steps: Sequence[int], update_every: int, sigma_rel: float) -> None:
    probe = Probe(len(steps))
    tracker = PostHocEMA(probe, sigma_rel, update_every=update_every)
    run_probe(tracker, probe, steps=steps)
    calls = applied_calls(len(steps), update_every)
    if not calls:
        return
    times = [steps[c - 1] for c in calls]
    assert tracker.ema_step == times[-1] and tracker.step == steps[-1]
    gamma = reference_gamma(float(f"{sigma_rel:.6g}"))  # the tracker keeps the canonical sigma_rel
    expected = np.zeros(len(steps))
    expected[np.array(calls) - 1] = exact_profile(times, gamma)
    got = tracker.ema_state_dict(sigma_rel)["x"].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)
    edges = [0, *times]
    mass = [profile_mass(lo, hi, times[-1], gamma) for lo, hi in itertools.pairwise(edges)]
    np.testing.assert_allclose(got[np.array(calls) - 1], mass, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize(
    "steps", [[1], [5], [1, 2, 3], [3, 4, 100], [2, 1000, 1001, 1002, 50_000], [7, 8, 200, 201, 202, 9999]]
)
@pytest.mark.parametrize("update_every", [1, 2, 3])
def test_irregular_explicit_steps(steps, update_every):
    check_irregular_steps(steps, update_every, 0.10)


@given(
    st.lists(st.integers(1, 10**7), min_size=1, max_size=40, unique=True).map(sorted),
    st.integers(1, 5),
    st.floats(0.005, 0.28),
)
@settings(max_examples=40, deadline=None)
def test_irregular_explicit_steps_property(steps, update_every, sigma_rel):
    check_irregular_steps(steps, update_every, sigma_rel)


def test_snapshot_when_an_explicit_step_crosses_the_period(tmp_path, make_tracker):
    probe = Probe(4)
    tracker = make_tracker(probe, 0.1, snapshot_every=500, snapshot_dir=tmp_path)
    run_probe(tracker, probe, steps=[1, 250, 1001, 1200])
    tracker.flush()
    assert [info.step for info in list_snapshots(tmp_path)] == [1001]


# -- dtypes ----------------------------------------------------------------------------------


def test_bf16_model_has_a_float32_ema_that_does_not_freeze():
    # Late in training 1 - beta ~ (gamma + 1) / t is tiny: a bf16 EMA rounds every
    # update away (ulp(1) = 2^-7), ours must move as the float64 reference does.
    sigma_rel, start, n = 0.10, 100_000, 400
    gamma = reference_gamma(sigma_rel)
    model = torch.nn.Linear(8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-1.0)
    tracker = PostHocEMA(model, sigma_rel)
    tracker.update(step=start)
    with torch.no_grad():
        model.weight.fill_(1.5)
        model.bias.fill_(-0.5)
    frozen = torch.ones((), dtype=torch.bfloat16)
    for step in range(start + 1, start + n + 1):
        tracker.update(step=step)
        frozen.lerp_(torch.tensor(1.5, dtype=torch.bfloat16), 1 - ((step - 1) / step) ** (gamma + 1))
    times = list(range(start, start + n + 1))
    expected_weight = power_ema([np.array(1.0)] + [np.array(1.5)] * n, times, gamma)
    expected_bias = power_ema([np.array(-1.0)] + [np.array(-0.5)] * n, times, gamma)
    ema = tracker.ema_state_dict(sigma_rel)
    assert ema["weight"].dtype == torch.float32 and ema["bias"].dtype == torch.float32
    assert float(expected_weight) - 1.0 > 0.01  # the reference moves by more than one bf16 ulp
    np.testing.assert_allclose(ema["weight"].numpy(), expected_weight, rtol=1e-5)
    np.testing.assert_allclose(ema["bias"].numpy(), expected_bias, rtol=1e-5)
    assert float(frozen) == 1.0  # what a bf16 EMA would have done


# -- reading the EMAs --------------------------------------------------------------------------


def bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def trained_tracker(model: torch.nn.Module, sigma_rels=(0.05, 0.10), **kwargs) -> PostHocEMA:
    tracker = PostHocEMA(model, sigma_rels, **kwargs)
    for call in range(1, 6):
        set_weights(model, call)
        tracker.update()
    set_weights(model, 99)  # the training weights now differ from every EMA
    return tracker


@pytest.mark.parametrize("raises", [False, True])
def test_swapped_puts_the_ema_in_and_restores_bit_for_bit(raises):
    model = Net(torch.float32)
    tracker = trained_tracker(model)
    with torch.no_grad():
        model.lin.weight[0, 0] = -0.0  # signed zero and NaN must survive too
        model.lin.weight[0, 1] = float("nan")
    before = {k: bits(t) for k, t in model.state_dict().items()}
    ema = tracker.ema_state_dict(0.05)

    class Boom(Exception):
        pass

    try:
        with tracker.swapped(model, sigma_rel=0.05) as inside:
            assert inside is model
            for name, value in model.state_dict().items():
                torch.testing.assert_close(value, ema[name].to(value.dtype), rtol=0, atol=0)
            with torch.no_grad():
                model.lin.weight.add_(1.0)  # e.g. evaluation that touches the weights
            if raises:
                raise Boom
    except Boom:
        assert raises
    assert {k: bits(t) for k, t in model.state_dict().items()} == before


def test_copy_to_loads_the_ema_in_the_models_dtype():
    model = Net(torch.float32)
    tracker = trained_tracker(model)
    other = Net(torch.bfloat16)
    tracker.copy_to(other, 0.10)
    ema = tracker.ema_state_dict(0.10)
    for name, value in other.state_dict().items():
        assert value.dtype == (torch.bfloat16 if name != "count" else torch.int64)
        torch.testing.assert_close(value, ema[name].to(value.dtype), rtol=0, atol=0)


def test_ema_state_dict_is_a_copy():
    model = Net()
    tracker = trained_tracker(model)
    ema = tracker.ema_state_dict(0.05)
    ema["lin.weight"].add_(100.0)
    assert not torch.equal(tracker.ema_state_dict(0.05)["lin.weight"], ema["lin.weight"])


# -- which tensors, under which names ------------------------------------------------------------


class Wrapped(torch.nn.Module):
    """Stands for DistributedDataParallel (attribute ``module``) or torch.compile (``_orig_mod``)."""

    def __init__(self, inner: torch.nn.Module, attribute: str) -> None:
        super().__init__()
        self.add_module(attribute, inner)


@pytest.mark.parametrize("attributes", [["module"], ["_orig_mod"], ["module", "_orig_mod"], ["_orig_mod", "module"]])
def test_wrapper_prefixes_are_stripped(tmp_path, make_tracker, attributes):
    torch.manual_seed(0)
    bare = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    wrapped = bare
    for attribute in attributes:
        wrapped = Wrapped(wrapped, attribute)
    prefix = "".join(f"{a}." for a in reversed(attributes))
    assert next(iter(wrapped.state_dict())).startswith(prefix)
    tracker = make_tracker(wrapped, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=2)
    for _ in range(4):
        tracker.update()
    tracker.flush()
    assert sorted(tracker.ema_state_dict(0.05)) == sorted(bare.state_dict())
    infos = list_snapshots(tmp_path)
    assert len(infos) == 4
    for info in infos:
        fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        fresh.load_state_dict(load_file(info.path), strict=True)
    tracker.copy_to(bare, 0.05)
    with tracker.swapped(bare, 0.10):
        pass


def test_model_that_cannot_be_deep_copied(tmp_path, make_tracker):
    class Unpicklable(Net):
        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()
            self.stream = (i for i in range(3))

    model = Unpicklable()
    with pytest.raises(TypeError):
        copy.deepcopy(model)
    tracker = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=3)
    history = []
    for call in range(1, 7):
        history.append(set_weights(model, call))
        tracker.update()
    tracker.flush()
    expected = power_ema([h["lin.weight"] for h in history], range(1, 7), reference_gamma(0.05))
    np.testing.assert_allclose(tracker.ema_state_dict(0.05)["lin.weight"].numpy(), expected, rtol=1e-12)
    assert [info.step for info in list_snapshots(tmp_path)] == [3, 3, 6, 6]
    with tracker.swapped(model, 0.05):
        np.testing.assert_allclose(model.lin.weight.detach().numpy(), expected, rtol=1e-12)


class Adapter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(3, 3)
        self.base.requires_grad_(False)
        self.lora = torch.nn.Linear(3, 3, bias=False)
        self.norm = torch.nn.BatchNorm1d(3)


def test_trainable_only():
    model = Adapter()
    model.norm.weight.requires_grad_(False)
    tracker = PostHocEMA(model, 0.1, trainable_only=True)
    assert sorted(tracker.ema_state_dict(0.1)) == ["lora.weight", "norm.bias"]


@pytest.mark.parametrize(
    ("exclude", "kept"),
    [
        ((), ["base.bias", "base.weight", "lora.weight", "norm.bias", "norm.num_batches_tracked",
              "norm.running_mean", "norm.running_var", "norm.weight"]),
        (["*.bias"], ["base.weight", "lora.weight", "norm.num_batches_tracked", "norm.running_mean",
                      "norm.running_var", "norm.weight"]),
        (["norm.*", "base.weight"], ["base.bias", "lora.weight"]),
        (["*running*", "*num_batches*"], ["base.bias", "base.weight", "lora.weight", "norm.bias", "norm.weight"]),
    ],
)  # fmt: skip
def test_exclude(exclude, kept):
    tracker = PostHocEMA(Adapter(), 0.1, exclude=exclude)
    assert sorted(tracker.ema_state_dict(0.1)) == kept


def test_tied_weights_appear_under_both_keys(tmp_path, make_tracker):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(4, 4, bias=False)
            self.head = torch.nn.Linear(4, 4, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    assert sorted(model.state_dict()) == ["embed.weight", "head.weight"]
    tracker = make_tracker(model, 0.1, snapshot_dir=tmp_path, snapshot_every=3)
    history = []
    for call in range(1, 4):
        with torch.no_grad():
            model.embed.weight.copy_(torch.full((4, 4), float(call)))
        history.append(np.full((4, 4), float(call)))
        tracker.update()
    tracker.flush()
    expected = power_ema(history, [1, 2, 3], reference_gamma(0.1))
    ema = tracker.ema_state_dict(0.1)
    for key in ("embed.weight", "head.weight"):
        np.testing.assert_allclose(ema[key].numpy(), expected, rtol=1e-6)
    (info,) = list_snapshots(tmp_path)
    fresh = Tied()
    fresh.load_state_dict(load_file(info.path), strict=True)
    np.testing.assert_allclose(fresh.head.weight.detach().numpy(), expected, rtol=1e-6)


def test_replaced_buffers_are_reported(tmp_path, make_tracker):
    model = Net(torch.float32)
    tracker = make_tracker(model, 0.1, snapshot_dir=tmp_path)
    tracker.update()
    model.to(torch.float64)  # creates new buffer tensors the tracker does not hold
    with pytest.raises(
        RuntimeError, match=r"'lin.weight' moved from cpu torch.float32 to cpu torch.float64.*\(model.to\(\)"
    ):
        tracker.snapshot()


# -- bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma_rels": (0.0,)}, r"sigma_rel=0\.0 is outside \(0, 0\.2886751\d+\)"),
        ({"sigma_rels": (0.05, 0.3)}, r"sigma_rel=0\.3 is outside \(0, 0\.2886751\d+\)"),
        ({"sigma_rels": -0.1}, r"sigma_rel=-0\.1 is outside \(0, 0\.2886751\d+\)"),
        ({"sigma_rels": ()}, r"sigma_rels is empty"),
        ({"sigma_rels": (0.05, 0.1, 0.05)}, r"sigma_rels=\(0\.05, 0\.1, 0\.05\) repeats a value"),
        ({"update_every": 0}, r"update_every=0 is not a positive integer"),
        ({"update_every": 2.5}, r"update_every=2\.5 is not a positive integer"),
        ({"update_every": True}, r"update_every=True is not a positive integer"),
        ({"snapshot_every": 0}, r"snapshot_every=0 is not a positive integer"),
        ({"snapshot_every": -10}, r"snapshot_every=-10 is not a positive integer"),
        ({"snapshot_dtype": "int8"}, r"dtype='int8' is not one of float32, float64, bfloat16, float16"),
        ({"exclude": ["*"]}, r"no tensors to track"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PostHocEMA(Net(), **kwargs)


def test_non_increasing_step():
    tracker = PostHocEMA(Net(), 0.1)
    tracker.update(step=5)
    for step, shown in [(5, "5"), (3, "3"), (0, "0")]:
        with pytest.raises(ValueError, match=rf"step={shown} must be an integer greater than the previous step 5"):
            tracker.update(step=step)
    assert tracker.step == 5
    tracker.update()
    assert tracker.step == 6


def test_snapshot_without_a_folder_or_an_update(tmp_path, make_tracker):
    with pytest.raises(ValueError, match="has no snapshot_dir; pass snapshot_dir= to write snapshots"):
        PostHocEMA(Net(), 0.1).snapshot()
    with pytest.raises(ValueError, match=r"nothing to snapshot: call update\(\)"):
        make_tracker(Net(), 0.1, snapshot_dir=tmp_path).snapshot()


def test_unknown_sigma_rel():
    model = Net()
    tracker = PostHocEMA(model, (0.05, 0.1))
    tracker.update()
    message = r"sigma_rel=0\.07 is not tracked; tracked: 0\.05, 0\.1"
    with pytest.raises(ValueError, match=message):
        tracker.ema_state_dict(0.07)
    with pytest.raises(ValueError, match=message):
        tracker.copy_to(model, 0.07)
    with pytest.raises(ValueError, match=message), tracker.swapped(model, 0.07):
        pass


def test_copy_to_a_model_without_the_tensors():
    tracker = PostHocEMA(Net(extra=True), 0.1)
    tracker.update()
    with pytest.raises(ValueError, match=r"the model lacks 2 tracked tensors, e\.g\. \['head\.weight', 'head\.bias'\]"):
        tracker.copy_to(Net(), 0.1)


# -- resume ------------------------------------------------------------------------------------------


def train(model: torch.nn.Module, tracker: PostHocEMA, calls: range, *, seed: int = 0) -> None:
    for call in calls:
        set_weights(model, seed + call)
        tracker.update()


def folder_contents(folder) -> dict[str, tuple[dict[str, str], dict[str, bytes]]]:
    """name -> (metadata, tensor bits) of every file; safetensors orders header keys arbitrarily, so not bytes."""
    contents = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            meta.pop("run_id")  # each run's own; compared on its own
            contents[path.name] = (meta, {k: bits(f.get_tensor(k)) for k in f.keys()})  # noqa: SIM118
    return contents


@pytest.mark.parametrize(("update_every", "stop"), [(1, 10), (1, 13), (3, 12), (3, 17), (4, 1)])
def test_resume_is_bit_for_bit(tmp_path, make_tracker, update_every, stop):
    n, options = 40, {"sigma_rels": (0.05, 0.10), "snapshot_every": 5, "update_every": update_every}
    model_a = Net(torch.float32)
    straight = make_tracker(model_a, snapshot_dir=tmp_path / "straight", **options)
    train(model_a, straight, range(1, n + 1))
    straight.flush()

    # A run that saves its state at `stop`, goes on a little on other data (writing
    # snapshots that the resumed run must replace), and dies.
    model_b = Net(torch.float32)
    interrupted = make_tracker(model_b, snapshot_dir=tmp_path / "resumed", **options)
    train(model_b, interrupted, range(1, stop + 1))
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    train(model_b, interrupted, range(stop + 1, stop + 8), seed=1000)
    interrupted.final_snapshot = False  # it dies: no final snapshot
    interrupted.close()

    torch.manual_seed(123)  # a fresh model with other weights, then the checkpoint's
    model_c = Net(torch.float32)
    set_weights(model_c, stop)
    resumed = make_tracker(model_c, snapshot_dir=tmp_path / "resumed", **options)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert (resumed.step, resumed.ema_step) == (interrupted.step - 7, stop - stop % update_every)
    train(model_c, resumed, range(stop + 1, n + 1))
    resumed.flush()

    assert (resumed.step, resumed.ema_step) == (straight.step, straight.ema_step)
    for sigma_rel in options["sigma_rels"]:
        a, b = straight.ema_state_dict(sigma_rel), resumed.ema_state_dict(sigma_rel)
        assert {k: bits(t) for k, t in a.items()} == {k: bits(t) for k, t in b.items()}
    files_a, files_b = folder_contents(tmp_path / "straight"), folder_contents(tmp_path / "resumed")
    assert list(files_a) == list(files_b)
    assert files_a == files_b
    # The resumed run is the interrupted one: one run id across its folder.
    assert resumed.run_id == interrupted.run_id != straight.run_id
    assert {i.run_id for i in list_snapshots(tmp_path / "resumed")} == {interrupted.run_id}


def test_load_state_dict_with_other_sigma_rels():
    state = trained_tracker(Net(), (0.05, 0.10)).state_dict()
    with pytest.raises(
        ValueError, match=r"tracks sigma_rel=0\.1, which this PostHocEMA does not \(it tracks 0\.05, 0\.2\)"
    ):
        PostHocEMA(Net(), (0.05, 0.20)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"tracks sigma_rel=0\.1, which this PostHocEMA does not \(it tracks 0\.05\)"):
        PostHocEMA(Net(), 0.05).load_state_dict(state)


def test_load_state_dict_with_other_tensor_names():
    state = trained_tracker(Net(), (0.05, 0.10)).state_dict()
    with pytest.raises(
        ValueError, match=re.escape("tensor names differ: missing ['head.weight', 'head.bias'], unexpected []")
    ):
        PostHocEMA(Net(extra=True), (0.05, 0.10)).load_state_dict(state)
    bigger = trained_tracker(Net(extra=True), (0.05, 0.10)).state_dict()
    with pytest.raises(
        ValueError, match=re.escape("tensor names differ: missing [], unexpected ['head.weight', 'head.bias']")
    ):
        PostHocEMA(Net(), (0.05, 0.10)).load_state_dict(bigger)


def test_load_state_dict_with_other_shapes():
    class Wider(Net):
        def __init__(self) -> None:
            super().__init__()
            self.out = torch.nn.Linear(4, 3, bias=False, dtype=torch.float64)

    state = trained_tracker(Net(), 0.1).state_dict()
    with pytest.raises(ValueError, match=r"'out\.weight' has shape \(2, 4\), expected \(3, 4\)"):
        PostHocEMA(Wider(), 0.1).load_state_dict(state)


def test_load_something_else():
    with pytest.raises(ValueError, match="not a PostHocEMA state_dict"):
        PostHocEMA(Net(), 0.1).load_state_dict(Net().state_dict())


# -- devices -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_with_emas_on_cpu_and_on_cuda(tmp_path, make_tracker, dtype):
    def run(device: str, ema_device: str | None, folder) -> PostHocEMA:
        torch.manual_seed(0)
        model = Net(dtype).to(device)
        tracker = make_tracker(
            model, (0.05, 0.10), device=ema_device, snapshot_dir=folder, snapshot_every=4, update_every=2
        )
        train(model, tracker, range(1, 13))
        tracker.flush()
        return tracker

    reference = run("cpu", None, tmp_path / "cpu")
    for ema_device, folder in [("cpu", tmp_path / "to-cpu"), (None, tmp_path / "on-cuda")]:
        tracker = run("cuda", ema_device, folder)
        for sigma_rel in (0.05, 0.10):
            ema = tracker.ema_state_dict(sigma_rel)
            expected_device = "cpu" if ema_device == "cpu" else "cuda"
            assert all(t.device.type == expected_device for t in ema.values())
            for name, value in reference.ema_state_dict(sigma_rel).items():
                torch.testing.assert_close(ema[name].cpu(), value, rtol=1e-6, atol=1e-6)
        assert [i.step for i in list_snapshots(folder)] == [i.step for i in list_snapshots(tmp_path / "cpu")]
        model = Net(dtype).to("cuda")
        with tracker.swapped(model, 0.05):
            assert model.lin.weight.device.type == "cuda"
