"""The error of 16-bit snapshots (issue 7): Plan.rounding_errors predicts it, and plan() and synthesize() warn."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke, make_model, write_snapshot

from posthoc_ema import PoorReconstructionWarning, PostHocEMA, RoundingWarning, plan, synthesize
from posthoc_ema.synthesis import UNIT_ROUNDOFF, rounding_errors

STEPS, EVERY, NARROW = 600, 10, 0.03


def run(folder: Path, dtype: str, *, steps: int = STEPS, every: int = EVERY) -> dict[str, torch.Tensor]:
    """tests/helpers.random_walk_run with ``dtype`` snapshots; returns the EMA of sigma_rel 0.03 tracked exactly."""
    model = make_model()
    emas = PostHocEMA(model, (0.05, 0.10), snapshot_dir=folder, snapshot_every=every, snapshot_dtype=dtype)
    exact = PostHocEMA(model, NARROW, snapshot_dir=None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(steps):
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=generator), alpha=0.05)
            model[1].num_batches_tracked.add_(1)
            emas.update()
            exact.update()
    emas.close()
    return exact.ema_state_dict(NARROW)


def flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([sd[k].double().reshape(-1) for k in sorted(sd) if sd[k].is_floating_point()])


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return float((flat(got) - flat(want)).norm() / flat(want).norm())


@pytest.fixture(scope="module")
def bfloat16_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("bf16")
    return folder, run(folder, "bfloat16")


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("f32")
    return folder, run(folder, "float32")


def test_bfloat16_error_is_predicted_and_warned(bfloat16_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """The issue's finding: far wider error than the profile error predicts, with no warning."""
    folder, exact = bfloat16_run
    with pytest.warns(
        RoundingWarning, match=r"1 of 1 targets \(sigma_rel 0\.03\) .* rounding of the bfloat16 snapshots"
    ):
        the_plan = plan(folder, NARROW)
    with pytest.warns(RoundingWarning, match="bfloat16"):
        synthesized = synthesize(folder, NARROW)
    measured = relative_error(synthesized, exact)
    rounded = {k: t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in exact.items()}
    just_rounded = relative_error(rounded, exact)
    assert measured > 3 * just_rounded  # amplified by the coefficients (norm about 6)
    assert measured > 2 * float(the_plan.errors[0])  # the profile error does not account for it
    assert the_plan.storage_dtypes == ("bfloat16",)
    # the rounding term predicts the measured error within a factor of 2
    predicted = float(the_plan.rounding_errors[0])
    assert 0.5 < measured / predicted < 2, (measured, predicted)


def test_bfloat16_within_the_tracked_range_does_not_warn(bfloat16_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, _ = bfloat16_run
    the_plan = plan(folder, [0.06, 0.08])  # pytest turns any warning into an error
    # about the cost of storing the EMA itself in bfloat16: 0.42 u with norms near 1
    assert np.all(the_plan.rounding_errors < 2 * 0.43 * UNIT_ROUNDOFF["BF16"])


def test_float32_never_warns(float32_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, exact = float32_run
    targets = [0.01, 0.02, NARROW, 0.05, 0.1, 0.2, 0.28]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        the_plan = plan(folder, targets)
    assert not [w for w in caught if issubclass(w.category, RoundingWarning)]
    assert the_plan.storage_dtypes == ("float32",)
    assert np.all(the_plan.rounding_errors < 1e-5)
    assert relative_error(synthesize(folder, NARROW), exact) < 1e-4


def test_rounding_model_against_monte_carlo() -> None:
    """Round snapshots that are near one another (as EMAs of a run are) to bf16 and fp16 for real."""
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(200_000, generator=generator, dtype=torch.float64)
    coefficients = np.array([[3.1], [-4.2], [0.6], [1.5]])  # sums to 1, norm 5.4
    snapshots = [target + 0.1 * torch.randn(target.shape, generator=generator, dtype=torch.float64) for _ in range(4)]
    exact = sum(float(c) * x for c, x in zip(coefficients[:, 0], snapshots, strict=True))
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float16, "F16")):
        stored = sum(float(c) * x.to(dtype).double() for c, x in zip(coefficients[:, 0], snapshots, strict=True))
        measured = float((stored - exact).norm() / exact.norm())
        (predicted,) = rounding_errors(coefficients, [UNIT_ROUNDOFF[name]] * 4)
        assert abs(measured / predicted - 1) < 0.25, (name, measured, predicted)
        # the bounds of the derivation hold
        assert measured <= UNIT_ROUNDOFF[name] * np.linalg.norm(coefficients) * 1.2


def test_mixed_storage_dtypes(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    for step in (10, 20, 30, 40):
        for sigma_rel in (0.05, 0.1):
            w = torch.randn(4, generator=generator)
            dtype = torch.bfloat16 if step == 30 else torch.float32
            write_snapshot(tmp_path, step, sigma_rel, {"w": w.to(dtype), "n": torch.tensor(step)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorReconstructionWarning)  # a short run: both kinds
        the_plan = plan(tmp_path, [0.07, NARROW])
    assert the_plan.storage_dtypes == ("bfloat16", "float32")
    roundoffs = [UNIT_ROUNDOFF["BF16"] if s.step == 30 else UNIT_ROUNDOFF["F32"] for s in the_plan.snapshots]
    expected = 0.4245 * np.sqrt((the_plan.coefficients**2 * np.square(roundoffs)[:, None]).sum(axis=0))
    np.testing.assert_allclose(the_plan.rounding_errors, expected, rtol=1e-3)
    assert the_plan.subset([1]).rounding_errors.tolist() == [the_plan.rounding_errors[1]]


def test_cli_report_shows_rounding_and_warns(bfloat16_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, _ = bfloat16_run
    stdout, stderr = invoke("synthesize", folder, "-s", "0.03", "-s", "0.07", "--dry-run")
    assert "bfloat16 rounding" in stdout
    the_plan = plan(folder, 0.07)
    row = next(line for line in stdout.splitlines() if line.startswith("0.07 "))
    assert f"{the_plan.rounding_errors[0]:.2%}" in row
    (line,) = stderr.splitlines()
    assert re.match(r"warning: 1 of 2 targets \(sigma_rel 0\.03\) lose about \d\.\d\d% .* bfloat16 snapshots", line)


@pytest.mark.slow
def test_issue_reproduction_2000_steps(tmp_path: Path) -> None:
    """The issue's run: 2,000 steps, target 0.03 from 0.05/0.10, bfloat16 snapshots."""
    exact = run(tmp_path, "bfloat16", steps=2000, every=EVERY)
    with pytest.warns(RoundingWarning, match="bfloat16"):
        the_plan = plan(tmp_path, NARROW)
    with pytest.warns(RoundingWarning):
        measured = relative_error(synthesize(tmp_path, NARROW), exact)
    assert 0.5 < measured / float(the_plan.rounding_errors[0]) < 2
