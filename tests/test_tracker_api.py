"""PostHocEMA's API edges: replaced tensors, argument types, validation before copying, to(), resume.

The EMA references are the float64 recursion of EDM2 eq. 127 written out here,
``ema = beta * ema + (1 - beta) * w`` with ``beta = (t_prev / t)**(gamma + 1)``.
"""

from __future__ import annotations

import copy
import logging
import pickle
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from posthoc_ema import ModelChangedError, PostHocEMA, SnapshotError, list_snapshots, plan, synthesize_many

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gamma_of(sigma_rel: float) -> float:
    """EDM2 eq. 126 by numpy.roots (independent of the library's closed form)."""
    c = sigma_rel**-2.0
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_ema(values: Sequence[np.ndarray], times: Sequence[float], gamma: float, start: float = 0.0) -> np.ndarray:
    """EDM2 eq. 127 at ``times``; the first value is copied (at time ``times[0]`` after ``start``)."""
    ema, prev = None, start
    for t, w in zip(times, values, strict=True):
        beta = (prev / t) ** (gamma + 1)
        ema = np.array(w, dtype=np.float64) if ema is None else beta * ema + (1 - beta) * np.asarray(w)
        prev = t
    assert ema is not None
    return ema


class Stat(torch.nn.Module):
    """A parameter and a buffer that ``forward`` replaces (a running statistic written by assignment)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.register_buffer("stat", torch.zeros(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stat = 0.5 * self.stat + x  # a new tensor each call
        return self.weight.sum() + self.stat.sum()


# -- 1. replaced tensors ---------------------------------------------------------------------


def test_a_replaced_parameter_is_followed():
    model = torch.nn.Linear(2, 1, bias=False, dtype=torch.float64)
    emas = PostHocEMA(model, 0.1, snapshot_every=None)
    history = [model.weight.detach().numpy().copy()]
    emas.update()
    model.weight = torch.nn.Parameter(torch.full((1, 2), 5.0, dtype=torch.float64))
    for _ in range(6):
        history.append(np.full((1, 2), 5.0))
        emas.update()
    expected = power_ema(history, range(1, 8), gamma_of(0.1))
    np.testing.assert_allclose(emas.ema_state_dict(0.1)["weight"].numpy(), expected, rtol=1e-12)
    # Once replaced, in-place changes of the new tensor are what the EMA sees.
    with torch.no_grad():
        model.weight.fill_(7.0)
    emas.update()
    history.append(np.full((1, 2), 7.0))
    expected = power_ema(history, range(1, 9), gamma_of(0.1))
    np.testing.assert_allclose(emas.ema_state_dict(0.1)["weight"].numpy(), expected, rtol=1e-12)


def test_load_state_dict_with_assign_is_followed():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, dtype=torch.float64))
    emas = PostHocEMA(model, 0.05, snapshot_every=None)
    first = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    emas.update()
    new = {k: torch.full_like(v, 5.0) for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)
    assert float(model[0].weight.detach()[0, 0]) == 5.0
    emas.update()
    emas.update()
    ema = emas.ema_state_dict(0.05)
    for key, value in first.items():
        expected = power_ema([value, np.full_like(value, 5.0), np.full_like(value, 5.0)], [1, 2, 3], gamma_of(0.05))
        np.testing.assert_allclose(ema[key].numpy(), expected, rtol=1e-12)


def test_a_buffer_assigned_in_forward_is_tracked_without_snapshots():
    model = Stat()
    emas = PostHocEMA(model, 0.1, snapshot_every=None)
    history = []
    for step in range(1, 6):
        model(torch.full((3,), float(step), dtype=torch.float64))
        history.append(model.stat.detach().numpy().copy())
        emas.update()
    expected = power_ema(history, range(1, 6), gamma_of(0.1))
    np.testing.assert_allclose(emas.ema_state_dict(0.1)["stat"].numpy(), expected, rtol=1e-12)


def test_a_buffer_replaced_behind_the_hooks_is_followed_at_a_snapshot(tmp_path, make_tracker):
    model = Stat()
    emas = make_tracker(model, 0.1, snapshot_dir=tmp_path, snapshot_every=2)
    emas.update()
    model._buffers["stat"] = torch.full((3,), 4.0, dtype=torch.float64)  # no hook sees this
    emas.update()  # a snapshot step: checked in full before the EMA is applied
    emas.flush()
    (info,) = list_snapshots(tmp_path)
    expected = power_ema([np.zeros(3), np.full(3, 4.0)], [1, 2], gamma_of(0.1))
    np.testing.assert_allclose(load_file(info.path)["stat"].numpy(), expected.astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize(
    ("replacement", "message"),
    [
        (torch.nn.Parameter(torch.zeros(1, 3, dtype=torch.float64)), r"shape \(1, 3\) instead of \(1, 2\)"),
        (torch.nn.Parameter(torch.zeros(1, 2, dtype=torch.float32)), "dtype torch.float32 instead of torch.float64"),
        (torch.nn.Parameter(torch.zeros(1, 2, dtype=torch.float64, device="meta")), "device meta instead of cpu"),
    ],
)
def test_a_replacement_the_ema_cannot_follow_is_named(replacement, message):
    model = torch.nn.Linear(2, 1, bias=False, dtype=torch.float64)
    emas = PostHocEMA(model, 0.1, snapshot_every=None)
    emas.update()
    before = emas.ema_state_dict(0.1)["weight"].clone()
    model.weight = replacement
    for _ in range(2):  # raised again on the next call: the dead tensor is never averaged
        with pytest.raises(ModelChangedError, match=rf"the model's tensor 'weight' was replaced by one with {message}"):
            emas.update()
    assert emas.step == 1
    assert torch.equal(emas.ema_state_dict(0.1)["weight"], before)


def test_a_removed_or_untied_tensor_is_named(tmp_path, make_tracker):
    model = torch.nn.Linear(2, 1, dtype=torch.float64)
    emas = make_tracker(model, 0.1, snapshot_dir=tmp_path, snapshot_every=1)
    model.bias = None  # torch calls no hook for None: the full check at the snapshot finds it
    with pytest.raises(ModelChangedError, match="the model's tensor 'bias' was removed"):
        emas.update()
    assert emas.step == 0

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(2, 2, bias=False)
            self.b = torch.nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight

    tied = Tied()
    emas = PostHocEMA(tied, 0.1, snapshot_every=None)
    tied.b.weight = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ModelChangedError, match=r"tied tensor 'a\.weight' \(also 'b\.weight'\).*some of its places"):
        emas.update()
    tied.a.weight = tied.b.weight  # tied again, to the new tensor: followed
    emas.update()
    assert torch.equal(emas.ema_state_dict(0.1)["a.weight"], torch.zeros(2, 2))


def test_a_model_moved_after_the_tracker_is_named_at_the_next_update():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    emas = PostHocEMA(model, 0.1, snapshot_every=None)
    emas.update()
    model.to(torch.float64)
    with pytest.raises(ModelChangedError, match=r"'0\.weight' moved from cpu torch\.float32 to cpu torch\.float64"):
        emas.update()


def test_assignments_to_other_modules_are_not_recorded():
    model = torch.nn.Linear(2, 1)
    emas = PostHocEMA(model, 0.1, snapshot_every=None)
    other = torch.nn.Linear(2, 1)
    other.weight = torch.nn.Parameter(torch.zeros(1, 2))  # not watched: nothing recorded
    assert emas._assigned == []
    model.weight = torch.nn.Parameter(torch.zeros(1, 2))
    assert len(emas._assigned) == 1
    emas.update()
    assert emas._assigned == []


def test_a_copied_tracker_follows_its_copy_of_the_model():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, dtype=torch.float64))
    emas = PostHocEMA(model, 0.1, snapshot_every=None)
    emas.update()
    first = model[0].weight.detach().numpy().copy()
    for twin in (copy.deepcopy(emas), pickle.loads(pickle.dumps(emas))):
        copied_model = twin._tracked[0].homes[0][0]
        assert copied_model is not model[0]
        copied_model.weight = torch.nn.Parameter(torch.full((2, 2), 5.0, dtype=torch.float64))
        twin.update()
        expected = power_ema([first, np.full((2, 2), 5.0)], [1, 2], gamma_of(0.1))
        np.testing.assert_allclose(twin.ema_state_dict(0.1)["0.weight"].numpy(), expected, rtol=1e-12)
    np.testing.assert_array_equal(emas.ema_state_dict(0.1)["0.weight"].numpy(), first)


# -- 2. sigma_rel identity -------------------------------------------------------------------


def test_sigma_rels_as_numpy_or_torch_numbers():
    model = torch.nn.Linear(2, 1)
    emas = PostHocEMA(model, torch.tensor([0.05, 0.1]), snapshot_every=None)
    assert emas.sigma_rels == (0.05, 0.1)
    emas.update()
    with torch.no_grad():
        model.weight.fill_(3.0)
    emas.update()
    for sigma_rel in (np.float32(0.05), torch.tensor(0.05), np.float64(0.05), 0.05):
        assert torch.equal(emas.ema_state_dict(sigma_rel)["weight"], emas.ema_state_dict(0.05)["weight"])
        with emas.swapped(model, sigma_rel):
            assert torch.equal(model.weight.detach(), emas.ema_state_dict(0.05)["weight"])
    target = torch.nn.Linear(2, 1)
    emas.copy_to(target, np.float32(0.1))
    assert torch.equal(target.weight.detach(), emas.ema_state_dict(0.1)["weight"])
    with pytest.raises(ValueError, match=r"sigma_rel='x' is not a number"):
        emas.ema_state_dict("x")  # type: ignore[arg-type]


def test_load_state_dict_matches_sigma_rels_in_any_order():
    model = torch.nn.Linear(2, 1)
    saved = PostHocEMA(model, (0.05, 0.1), snapshot_every=None)
    saved.update()
    with torch.no_grad():
        model.weight.fill_(2.0)
    saved.update()
    resumed = PostHocEMA(model, (np.float32(0.1), 0.05), snapshot_every=None)
    resumed.load_state_dict(saved.state_dict())
    for sigma_rel in (0.05, 0.1):
        assert torch.equal(resumed.ema_state_dict(sigma_rel)["weight"], saved.ema_state_dict(sigma_rel)["weight"])


# -- 3. step types ---------------------------------------------------------------------------


def test_steps_of_any_integer_type():
    emas = PostHocEMA(torch.nn.Linear(2, 1), 0.1, snapshot_every=None)
    for step in (np.int64(3), torch.tensor(5), np.uint8(7), 9):
        emas.update(step=step)
        assert emas.step == int(step) and type(emas.step) is int
    emas.update(np.int32(11))
    assert emas.step == 11


@pytest.mark.parametrize("step", [12.0, 12.5, True, np.float64(12), torch.tensor(12.0), "12", torch.tensor([12, 13])])
def test_non_integer_steps_are_refused(step):
    emas = PostHocEMA(torch.nn.Linear(2, 1), 0.1, snapshot_every=None)
    emas.update(step=10)
    with pytest.raises(ValueError, match=r"step=.* is not an integer; give an int"):
        emas.update(step=step)
    assert emas.step == 10


def test_plan_steps_must_be_integers(tmp_path):
    from helpers import random_walk_run

    folder = random_walk_run(tmp_path, steps=20, every=10)
    assert plan(folder, 0.05, step=np.int64(10)).step == 10
    assert type(plan(folder, 0.05, step=torch.tensor(10)).step) is int
    with pytest.raises(ValueError, match=r"step=10\.0 is not an integer"):
        plan(folder, 0.05, step=10.0)  # type: ignore[arg-type]


# -- 4. timm-style update(model) ----------------------------------------------------------


def test_update_accepts_the_model():
    model = torch.nn.Linear(2, 1)
    emas = PostHocEMA(model, 0.1, snapshot_every=None)
    emas.update(model)
    emas.update(model, step=5)
    assert emas.step == 5

    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    emas.update(Wrapper(model))
    assert emas.step == 6
    wrapped = Wrapper(torch.nn.Linear(2, 1))
    inner = PostHocEMA(wrapped, 0.1, snapshot_every=None)
    inner.update(wrapped.module)  # the module a wrapper wraps holds every tracked tensor
    with pytest.raises(ValueError, match="update\\(\\) was given a Linear that does not hold the tracked tensors"):
        emas.update(torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"step given twice"):
        emas.update(7, step=8)
    assert emas.step == 6


# -- 5. copy_to / swapped validate first -----------------------------------------------------


def _mismatched() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 4))


def _bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["copy_to", "swapped"])
def test_a_mismatched_layer_leaves_the_model_untouched(method):
    source = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    emas = PostHocEMA(source, 0.1, snapshot_every=None)
    emas.update()
    target = _mismatched()
    before = _bits(target)
    with pytest.raises(ValueError, match=r"the model's '1\.weight' has shape \(4, 3\), the EMA's \(2, 3\); nothing"):
        if method == "copy_to":
            emas.copy_to(target, 0.1)
        else:
            with emas.swapped(target, 0.1):
                pass
    after = _bits(target)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_copy_to_refuses_an_integer_tensor_for_a_floating_ema():
    source = torch.nn.Module()
    source.register_buffer("scale", torch.ones(2))
    source.register_buffer("count", torch.zeros((), dtype=torch.long))
    emas = PostHocEMA(source, 0.1, snapshot_every=None)
    target = torch.nn.Module()
    target.register_buffer("scale", torch.zeros(2, dtype=torch.long))
    target.register_buffer("count", torch.zeros((), dtype=torch.long))
    with pytest.raises(ValueError, match=r"'scale' is torch.int64, which the EMA's torch.float32 cannot be cast to"):
        emas.copy_to(target, 0.1)
    assert torch.equal(target.scale, torch.zeros(2, dtype=torch.long))


# -- 6, 7, 8. construction -----------------------------------------------------------------


def test_a_model_without_floating_tensors_is_refused():
    counter = torch.nn.Module()
    counter.register_buffer("count", torch.zeros((), dtype=torch.long))
    with pytest.raises(ValueError, match=r"no floating tensor \(only integer buffers\) to track"):
        PostHocEMA(counter, 0.1)
    with pytest.raises(ValueError, match="has no tensors to track"):
        PostHocEMA(torch.nn.Linear(2, 1), 0.1, exclude=["*"])


def test_an_exclude_pattern_that_matches_nothing_warns():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    with pytest.warns(UserWarning, match=r"exclude pattern 'module\.0\.\*' matches no key.*no 'module\.' prefix"):
        emas = PostHocEMA(model, 0.1, exclude=["module.0.*", "1.bias"])
    assert sorted(emas.ema_state_dict(0.1)) == ["0.bias", "0.weight", "1.weight"]
    with pytest.warns(UserWarning, match=r"exclude pattern '0\.wieght' matches no key of the model; keys are"):
        PostHocEMA(model, 0.1, exclude=["0.wieght"])


def test_a_snapshot_dir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "ckpts"
    path.write_text("not a folder")
    for folder in (path, path / "sub"):
        with pytest.raises(ValueError, match=rf"snapshot_dir='{folder}' is a file \(or lies under one\), not a folder"):
            PostHocEMA(torch.nn.Linear(2, 1), 0.1, snapshot_dir=folder)


# -- 9. to() ---------------------------------------------------------------------------------


def test_to_a_dtype_averages_in_it():
    model = torch.nn.Linear(2, 1)
    emas = PostHocEMA(model, 0.1, snapshot_every=None)
    assert emas.to("cpu") is emas
    emas.to(dtype=torch.float64)
    history = []
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.fill_(1.0 / 3.0 * step)
        history.append(model.weight.detach().double().numpy().copy())
        emas.update()
    ema = emas.ema_state_dict(0.1)["weight"]
    assert ema.dtype == torch.float64
    expected = power_ema(history, range(1, 5), gamma_of(0.1))
    np.testing.assert_allclose(ema.numpy(), expected, rtol=1e-13)  # float32 sources, float64 averaging
    with pytest.raises(ValueError, match=r"dtype=torch.int64 is not a floating dtype"):
        emas.to(dtype=torch.int64)


@needs_cuda
def test_to_cuda_and_back(tmp_path, make_tracker):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    emas = make_tracker(model, 0.1, snapshot_dir=tmp_path, snapshot_every=2).to("cuda")
    emas.update()
    assert emas.ema_state_dict(0.1)["0.weight"].device.type == "cuda"
    assert emas.ema_state_dict(0.1)["1.num_batches_tracked"].device.type == "cuda"
    emas.update()
    emas.flush()
    emas.to("cpu")
    emas.update()
    target = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    emas.copy_to(target, 0.1)
    assert torch.allclose(target[0].weight, model[0].weight)


# -- 10. a sigma_rel added on resume ------------------------------------------------------


def test_a_sigma_rel_added_on_resume(tmp_path, make_tracker, caplog):
    model = torch.nn.Linear(2, 1, bias=False)
    first = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=2)
    values = []
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.fill_(float(step))
        values.append(float(step))
        first.update()
    first.close()
    state = first.state_dict()
    resumed = make_tracker(model, (0.10, 0.15, 0.05), snapshot_dir=tmp_path, snapshot_every=2)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.ema_state_dict(0.15)["weight"], torch.full((1, 2), 4.0))
    for sigma_rel in (0.05, 0.10):
        assert torch.equal(resumed.ema_state_dict(sigma_rel)["weight"], first.ema_state_dict(sigma_rel)["weight"])
    for step in range(5, 9):
        with torch.no_grad():
            model.weight.fill_(float(step))
        values.append(float(step))
        resumed.update()
    resumed.flush()
    # The added EMA: a copy at step 4, then eq. 127 from there.
    expected = power_ema(values[3:], range(4, 9), gamma_of(0.15), start=4.0)
    np.testing.assert_allclose(resumed.ema_state_dict(0.15)["weight"].numpy(), np.full((1, 2), expected), rtol=1e-6)
    expected = power_ema(values, range(1, 9), gamma_of(0.05))
    np.testing.assert_allclose(resumed.ema_state_dict(0.05)["weight"].numpy(), np.full((1, 2), expected), rtol=1e-6)
    starts = {(i.step, i.sigma_rel): i.start_step for i in list_snapshots(tmp_path)}
    assert starts[(6, 0.15)] == starts[(8, 0.15)] == 4
    assert starts[(8, 0.05)] is None and starts[(2, 0.1)] is None
    assert resumed.state_dict()["start_steps"] == [0, 4, 0]
    # Synthesis leaves the late EMA out, and says so.
    with caplog.at_level(logging.WARNING, logger="posthoc_ema.synthesis"):
        the_plan = plan(tmp_path, 0.08)
    assert all(s.start_step is None for s in the_plan.snapshots) and len(the_plan.snapshots) == 8
    assert "leaving out 2 snapshots of EMAs added on resume (sigma_rel 0.15, from step 4)" in caplog.text
    again = make_tracker(model, (0.10, 0.15, 0.05))
    again.load_state_dict(resumed.state_dict())
    assert again._start_steps == [0, 4, 0]


def test_synthesis_refuses_a_folder_of_late_emas_only(tmp_path, make_tracker):
    model = torch.nn.Linear(2, 1)
    first = make_tracker(model, 0.05)
    first.update()
    late = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=1)
    late.load_state_dict(first.state_dict())
    late.update()
    late.flush()
    for info in list_snapshots(tmp_path):
        if info.start_step is None:
            info.path.unlink()
    with pytest.raises(SnapshotError, match=r"every snapshot is of an EMA added on resume \(start_step > 0\)"):
        plan(tmp_path, 0.07)


# -- 11. synthesis leaves torch's thread settings alone ---------------------------------------


def test_synthesis_leaves_other_threads_thread_count(tmp_path):
    from helpers import random_walk_run

    folder = random_walk_run(tmp_path, steps=20, every=10)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        fresh: list[int] = []
        thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        seen.append((torch.get_num_threads(), fresh[0]))

    try:
        synthesize_many(folder, [0.05], progress=progress)
        assert torch.get_num_threads() == 2
        assert seen and all(pair == (2, 2) for pair in seen)
    finally:
        torch.set_num_threads(before)


class _GatheringStateDict(torch.nn.Linear):
    """A module whose state_dict() returns copies, as FSDP's full state dict does (gathered tensors)."""

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return {k: v.detach().clone() for k, v in super().state_dict(*args, **kwargs).items()}


def test_a_state_dict_of_copies_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"state_dict\(\) gives 'weight' as a tensor that no module of the model holds"
    ):
        PostHocEMA(_GatheringStateDict(3, 2), (0.05,))


def test_a_failed_update_records_no_step():
    """An update that raises (the model moved) leaves step and call count as they were: fixing the model and going on
    gives the numbers of a run that never failed."""
    model = torch.nn.Linear(2, 1)
    emas = PostHocEMA(model, 0.1, snapshot_every=None, update_every=2)
    emas.update()
    model.to(torch.float64)
    with pytest.raises(ModelChangedError):
        emas.update()
    assert (emas.step, emas.ema_step, emas._calls) == (1, 0, 1)
    model.to(torch.float32)
    emas.update()
    assert (emas.step, emas.ema_step) == (2, 2)


def test_snapshot_checks_the_model_before_bringing_the_emas_up_to_date(tmp_path, make_tracker):
    model = Stat()
    emas = make_tracker(model, 0.1, snapshot_dir=tmp_path, snapshot_every=None, update_every=4)
    emas.update()
    emas.update()  # skipped by update_every: snapshot() applies this step
    model._buffers["stat"] = torch.full((3,), 4.0, dtype=torch.float64)  # no hook sees this
    emas.snapshot()
    emas.flush()
    (info,) = list_snapshots(tmp_path)
    # Step 1 was skipped, so step 2's update copies (beta = 0): the new buffer, not the dead one (zeros).
    np.testing.assert_array_equal(load_file(info.path)["stat"].numpy(), np.full(3, 4.0, dtype=np.float32))


def test_a_foreign_unreadable_file_does_not_stop_training(tmp_path, make_tracker, caplog):
    (tmp_path / "half-downloaded.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    model = torch.nn.Linear(2, 1)
    emas = make_tracker(model, 0.1, snapshot_dir=tmp_path, snapshot_every=2)
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            emas.update()
        emas.flush()
    assert [i.step for i in list_snapshots(tmp_path, skip_unreadable=True)] == [2, 4]
    assert "half-downloaded.safetensors" in caplog.text
    with pytest.raises(SnapshotError, match="half-downloaded"):
        list_snapshots(tmp_path)


def test_resume_speaks_only_of_its_own_runs_later_snapshots(tmp_path, caplog):
    model = torch.nn.Linear(2, 1)
    with PostHocEMA(torch.nn.Linear(2, 1), 0.1, snapshot_dir=tmp_path, snapshot_every=2, prefix="other") as other:
        for _ in range(6):
            other.update()
    emas = PostHocEMA(model, 0.1, snapshot_dir=tmp_path, snapshot_every=2)
    emas.update()
    state = emas.state_dict()
    resumed = PostHocEMA(model, 0.1, snapshot_dir=tmp_path, snapshot_every=2)
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(state)
    assert "after the resumed step" not in caplog.text  # the other prefix's steps 2..6 are not this run's
    emas.close()
    resumed.close()
