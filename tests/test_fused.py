"""The fused update (``fused=True``): bit for bit the plain update, whatever the model does."""

from __future__ import annotations

import copy
import pickle
import shutil
from collections.abc import Iterable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posthoc_ema import ModelChangedError, PostHocEMA
from posthoc_ema import fused as fused_module
from posthoc_ema.fused import BlockedLerp
from posthoc_ema.schedules import Constant, HalfLife

SIGMA_RELS = (0.03, 0.05, 0.10, 0.20)
SCHEDULES = {"timm": Constant(0.9), "half": HalfLife(3.0)}


class Mixed(torch.nn.Module):
    """Tensors of every kind the tracker groups: float32, float64, a strided one, tied, integer buffers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(37, 29)
        self.head = torch.nn.Linear(37, 29, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.norm = torch.nn.BatchNorm1d(29)  # num_batches_tracked: an integer buffer, copied
        self.wide = torch.nn.Parameter(torch.randn(300, dtype=torch.float64))
        self.strided = torch.nn.Parameter(torch.randn(7, 11).t())  # not contiguous: goes whole into a block
        self.register_buffer("stat", torch.randn(5, 13))


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 512 bytes, so the tiny models are cut inside tensors and across them."""
    monkeypatch.setattr(fused_module, "BLOCK_BYTES", 512)


def walk(model: torch.nn.Module, generator: torch.Generator) -> None:
    """One training step's change: every floating tensor moves, the counter counts."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device))
            else:
                t.add_(1)


def pair(model: torch.nn.Module, **kwargs) -> tuple[PostHocEMA, PostHocEMA]:
    plain = PostHocEMA(model, SIGMA_RELS, schedules=SCHEDULES, snapshot_every=None, **kwargs)
    fused = PostHocEMA(model, SIGMA_RELS, schedules=SCHEDULES, snapshot_every=None, fused=True, **kwargs)
    return plain, fused


def assert_same(plain: PostHocEMA, fused: PostHocEMA) -> None:
    assert fused.step == plain.step and fused.ema_step == plain.ema_step
    for name in [*plain.sigma_rels, *plain.names]:
        ours, theirs = fused.ema_state_dict(name), plain.ema_state_dict(name)
        assert list(ours) == list(theirs)
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype
            assert torch.equal(ours[key], theirs[key]), (name, key)


def run(model: torch.nn.Module, trackers: tuple[PostHocEMA, ...], steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        walk(model, generator)
        for tracker in trackers:
            tracker.update()


@pytest.mark.parametrize("update_every", [1, 3])
def test_fused_is_the_plain_update_bit_for_bit(update_every):
    model = Mixed()
    plain, fused = pair(model, update_every=update_every)
    assert not plain.fused and fused.fused
    run(model, (plain, fused), steps=40)  # weights from ~1 (early steps) to far below 0.5
    assert_same(plain, fused)
    # It really is blocked: several blocks, pieces of one tensor in different blocks.
    plans = {plan._sources[0].dtype: plan for plan in fused._fused_plans.values()}
    assert plans[torch.float32].n_blocks > 5 and plans[torch.float64].n_blocks > 1
    # ... and really moved: the EMAs are not the model, nor where they started.
    assert not torch.equal(fused.ema_state_dict(0.05)["embed.weight"], model.embed.weight)


def test_fused_blocks_are_built_once():
    model = Mixed()
    plain, fused = pair(model)
    run(model, (plain, fused), steps=1)
    plans = dict(fused._fused_plans)
    assert not plain._fused_plans
    run(model, (plain, fused), steps=5)
    assert all(fused._fused_plans[n] is plan for n, plan in plans.items())  # the same views, not new ones


def test_fused_moves_by_the_lerp_formula():
    """An independent float64 reference: ema <- ema + w (x - ema), w = 1 - beta (EDM2 eq. 127)."""
    model = torch.nn.Linear(40, 30)
    tracker = PostHocEMA(model, 0.10, snapshot_every=None, fused=True)
    gamma = tracker.gammas[0]
    expected = model.weight.detach().double().clone()
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 20):
        walk(model, generator)
        tracker.update()
        weight = 1.0 - ((step - 1) / step) ** (gamma + 1)
        expected += weight * (model.weight.detach().double() - expected)
    torch.testing.assert_close(tracker.ema_state_dict(0.1)["weight"].double(), expected, rtol=1e-5, atol=1e-6)


def test_fused_with_staging_and_after_to():
    model = Mixed().to(torch.bfloat16)  # staged into float32 before the lerps
    plain, fused = pair(model, device="cpu")
    run(model, (plain, fused), steps=7)
    assert_same(plain, fused)
    for tracker in (plain, fused):
        tracker.to(dtype=torch.float64)  # new EMA tensors: the blocks are rebuilt
    assert not fused._fused_plans
    run(model, (plain, fused), steps=7, seed=1)
    assert_same(plain, fused)
    assert fused.ema_state_dict(0.05)["stat"].dtype == torch.float64


def test_fused_follows_replaced_tensors():
    model = Mixed()
    plain, fused = pair(model)
    run(model, (plain, fused), steps=5)
    torch.manual_seed(3)
    model.stat = torch.randn(5, 13)  # a new buffer of the same shape: followed
    model.embed.weight = torch.nn.Parameter(torch.randn(29, 37))  # tied: replaced in both places
    model.head.weight = model.embed.weight
    run(model, (plain, fused), steps=5, seed=1)
    assert_same(plain, fused)
    # The blocks were rebuilt over the new tensors, not the old ones.
    viewed = {t.untyped_storage().data_ptr() for plan in fused._fused_plans.values() for t in plan._sources}
    assert model.stat.untyped_storage().data_ptr() in viewed


def test_fused_refuses_a_moved_model_as_the_plain_update():
    model = Mixed()
    plain, fused = pair(model)
    run(model, (plain, fused), steps=2)
    model.double()
    messages = []
    for tracker in (plain, fused):
        with pytest.raises(ModelChangedError, match="create PostHocEMA after moving the model") as raised:
            tracker.update()
        messages.append(str(raised.value))
    assert messages[0] == messages[1]


def test_fused_resumes_bit_for_bit(tmp_path):
    model = Mixed()
    plain, fused = pair(model, update_every=2)
    run(model, (plain, fused), steps=9)
    torch.save(fused.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = PostHocEMA(model, SIGMA_RELS, schedules=SCHEDULES, snapshot_every=None, fused=True, update_every=2)
    resumed.update()  # its blocks exist already: the load copies into the same tensors
    resumed.load_state_dict(state)
    assert_same(fused, resumed)
    run(model, (plain, fused, resumed), steps=9, seed=1)
    assert_same(plain, resumed)
    assert_same(fused, resumed)


def test_fused_copies_and_pickles_without_its_blocks():
    model = Mixed()
    plain, fused = pair(model)
    run(model, (plain, fused), steps=4)
    assert fused._fused_plans
    assert "_fused_plans" not in fused.__getstate__()
    assert pickle.loads(pickle.dumps(fused)).fused
    model_copy, fused_copy = copy.deepcopy((model, fused))
    plain_copy = PostHocEMA(model_copy, SIGMA_RELS, schedules=SCHEDULES, snapshot_every=None)
    plain_copy.load_state_dict(plain.state_dict())
    run(model_copy, (plain_copy, fused_copy), steps=4, seed=2)
    assert_same(plain_copy, fused_copy)
    assert_same(plain, fused)  # the copy's blocks view the copy's tensors: the original's EMAs did not move
    assert not torch.equal(fused.ema_state_dict(0.05)["stat"], fused_copy.ema_state_dict(0.05)["stat"])


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    n_emas=st.integers(1, 4),
    block_bytes=st.integers(1, 3000),
    weights=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    float64=st.booleans(),
)
def test_blocked_lerp_is_foreach_lerp(sizes, n_emas, block_bytes, weights, float64):
    dtype = torch.float64 if float64 else torch.float32
    generator = torch.Generator().manual_seed(sum(sizes))
    sources = [torch.randn(n, generator=generator, dtype=dtype) for n in sizes]
    expected = [[torch.randn(n, generator=generator, dtype=dtype) for n in sizes] for _ in range(n_emas)]
    emas = [[t.clone() for t in ema] for ema in expected]
    plan = BlockedLerp(sources, emas, block_bytes=block_bytes)
    for ema, weight in zip(expected, weights, strict=False):
        torch._foreach_lerp_(ema, sources, weight)
    plan(weights[:n_emas])
    for ours, theirs in zip(emas, expected, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    covered = sum(t.numel() for block, _ in plan._blocks for t in block)
    assert covered == sum(sizes)  # every element once
    assert plan.matches(sources, emas) and not plan.matches(list(sources), emas)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device", [None, "cpu"])
def test_fused_on_cuda(device):
    model = Mixed().cuda()  # EMAs beside it, or on the CPU through pinned staging
    plain, fused = pair(model, device=device)
    run(model, (plain, fused), steps=6)
    assert_same(plain, fused)


# ------------------------------------------------------------------ fused="compile"


class Layers(torch.nn.Module):
    """Ten 16x16 weights (compiled, with a small MIN_COMPILED: two chunks, the second padded), their biases
    (too small: blocked), a float64 tensor (its own group and kernel) and a strided one (blocked)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(10)])
        self.wide = torch.nn.Parameter(torch.randn(width * width, dtype=torch.float64))
        self.strided = torch.nn.Parameter(torch.randn(width, width).t())


class FakeKernel:
    """An exact stand-in for a compiled kernel (torch's own lerp per tensor) that counts, and fails at given calls."""

    def __init__(self, fail_at: Iterable[int] = ()) -> None:
        self.calls, self.elements, self.fail_at = 0, 0, set(fail_at)

    def __call__(self, sources, emas, weights):
        self.calls += 1
        if self.calls in self.fail_at:
            raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")
        self.elements += sum(t.numel() for t in sources)
        for targets, weight in zip(emas, weights.tolist(), strict=True):
            torch._foreach_lerp_(targets, sources, weight)


@pytest.fixture
def no_kernels(monkeypatch):
    """A fresh kernel cache and a MIN_COMPILED that the tiny models reach."""
    monkeypatch.setattr(fused_module, "_kernels", {})
    monkeypatch.setattr(fused_module, "_unavailable", [])
    monkeypatch.setattr(fused_module, "MIN_COMPILED", 64)


def compile_pair(model: torch.nn.Module) -> tuple[PostHocEMA, PostHocEMA]:
    plain = PostHocEMA(model, SIGMA_RELS, schedules=SCHEDULES, snapshot_every=None)
    compiled = PostHocEMA(model, SIGMA_RELS, schedules=SCHEDULES, snapshot_every=None, fused="compile")
    return plain, compiled


def test_fused_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="fused='fast' is not one of False, True, 'compile'"):
        PostHocEMA(torch.nn.Linear(2, 2), 0.1, fused="fast")


def small_weight_steps(tracker: PostHocEMA, steps: range) -> int:
    """How many of these steps have every weight below 0.5 (EDM2 eq. 127, and 1 - beta of each schedule)."""
    return sum(
        all(1.0 - ((step - 1) / step) ** (g + 1) < 0.5 for g in tracker.gammas)
        and all(1.0 - float(schedule.beta(step, step - 1)) < 0.5 for schedule in SCHEDULES.values())
        for step in steps
    )


def test_compiled_chunks_cover_every_tensor_once(monkeypatch, no_kernels):
    kernel = FakeKernel()
    monkeypatch.setattr(fused_module, "_compile", lambda fn: kernel)
    model = Layers()
    plain, compiled = compile_pair(model)
    run(model, (plain, compiled), steps=1)  # the first weights are 1: the blocked update, after the probes
    plans = {plan._sources[0].dtype: plan for plan in compiled._fused_plans.values()}
    assert all(plan.compiled for plan in plans.values())
    assert kernel.calls == 2  # one probe per dtype; the first update did not use the kernel
    run(model, (plain, compiled), steps=79, seed=1)
    assert_same(plain, compiled)  # a tensor missed, or updated twice, would show
    # Float32: ten 256-element weights in two chunks of 8 (six of them scratch); float64: one chunk of 8.
    assert [len(sources) for sources, _ in plans[torch.float32]._chunks] == [8, 8]
    assert [len(sources) for sources, _ in plans[torch.float64]._chunks] == [8]
    n_compiled = small_weight_steps(compiled, range(2, 81))
    assert 10 < n_compiled < 79  # both paths were taken
    assert kernel.calls == 2 + 3 * n_compiled


def run_compiled(monkeypatch, caplog, compile, steps: int, level: str = "WARNING") -> tuple[PostHocEMA, list[str]]:
    """Plain and ``fused="compile"`` over :class:`Layers`, ``compile`` standing in for torch.compile:
    the same numbers whatever it does; the compiled tracker, and the warnings logged."""
    monkeypatch.setattr(fused_module, "_compile", compile)
    model = Layers()
    plain, compiled = compile_pair(model)
    with caplog.at_level(level, logger="posthoc_ema.fused"):
        run(model, (plain, compiled), steps=steps)
        PostHocEMA(model, SIGMA_RELS, snapshot_every=None, fused="compile").update()  # another tracker, other k
    assert_same(plain, compiled)
    return compiled, [r.getMessage() for r in caplog.records]


def test_compile_unavailable_falls_back_with_one_warning(monkeypatch, no_kernels, caplog):
    def no_compiler(fn):
        raise RuntimeError("no C++ compiler found\nsecond line")

    compiled, messages = run_compiled(monkeypatch, caplog, no_compiler, steps=60)
    assert not any(plan.compiled for plan in compiled._fused_plans.values())
    assert len(messages) == 1, messages  # once per process: not per dtype, tracker or update
    assert "torch.compile is not available here (RuntimeError: no C++ compiler found second line)" in messages[0]
    assert "using the blocked update (fused=True) instead" in messages[0]


def test_inexact_kernel_is_refused(monkeypatch, no_kernels, caplog):
    """The traced function run as plain Python rounds the product before the add: not torch's lerp."""
    compiled, messages = run_compiled(monkeypatch, caplog, lambda fn: fn, steps=60)
    assert not any(plan.compiled for plan in compiled._fused_plans.values())
    assert any("is not torch's bit for bit here (torch.float32, cpu)" in m for m in messages)


def test_a_new_global_state_is_compiled_and_checked_on_the_probe(monkeypatch, no_kernels, caplog):
    # Calls 1, 2: the probes (float32, float64). Call 4, the first compiled update's second float32 chunk,
    # meets another global state: call 5 is the probe that compiles and checks it, 6 the chunk again.
    kernel = FakeKernel(fail_at={4})
    compiled, messages = run_compiled(monkeypatch, caplog, lambda fn: kernel, steps=80, level="INFO")
    assert all(plan.compiled for plan in compiled._fused_plans.values())
    assert any("compiled again for a new global state (RuntimeError: Detected recompile" in m for m in messages)
    assert not any(r.levelname == "WARNING" for r in caplog.records)


def test_a_kernel_failing_again_finishes_the_update_without_it(monkeypatch, no_kernels, caplog):
    kernel = FakeKernel(fail_at={4, 6})  # the chunk fails again after its probe passed
    compiled, messages = run_compiled(monkeypatch, caplog, lambda fn: kernel, steps=80)
    float32 = next(p for p in compiled._fused_plans.values() if p._sources[0].dtype == torch.float32)
    assert not float32.compiled
    assert any("the compiled kernel cannot be used (RuntimeError: Detected recompile" in m for m in messages)


@pytest.mark.parametrize("mode", [True, "compile"])
def test_fused_follows_data_replaced_in_place(monkeypatch, no_kernels, mode):
    """``p.data = ...`` keeps the Parameter but not its storage: the plain update follows it, so must the blocks."""
    monkeypatch.setattr(fused_module, "_compile", lambda fn: FakeKernel())
    model = Layers()
    plain = PostHocEMA(model, SIGMA_RELS, snapshot_every=None)
    fused = PostHocEMA(model, SIGMA_RELS, snapshot_every=None, fused=mode)
    run(model, (plain, fused), steps=60)
    torch.manual_seed(4)
    model.layers[3].weight.data = torch.randn(16, 16)
    model.layers[3].bias.data = torch.randn(16)
    run(model, (plain, fused), steps=5, seed=1)
    assert_same(plain, fused)


def real_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not real_compiler(), reason="torch.compile needs a C++ compiler")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's inductor warns about its own torch.jit use
def test_compiled_kernel_is_the_plain_update_bit_for_bit(monkeypatch, caplog):
    """The real torch.compile: exact over 80 updates in float32 and float64, under autocast too, no warning."""
    monkeypatch.setattr(fused_module, "_kernels", {})
    monkeypatch.setattr(fused_module, "_unavailable", [])
    monkeypatch.setattr(fused_module, "MIN_COMPILED", 1000)
    model = Layers(width=40)  # 1,600-element weights, in two chunks
    plain = PostHocEMA(model, (0.05, 0.10), schedules={"timm": Constant(0.9)}, snapshot_every=None)
    compiled = PostHocEMA(model, (0.05, 0.10), schedules={"timm": Constant(0.9)}, snapshot_every=None, fused="compile")
    with caplog.at_level("WARNING", logger="posthoc_ema.fused"):
        run(model, (plain, compiled), steps=60)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another global state: compiled once more, checked
            run(model, (plain, compiled), steps=10, seed=1)
        run(model, (plain, compiled), steps=10, seed=2)  # and back: both kernels are kept
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert len(compiled._fused_plans) == 2 and all(plan.compiled for plan in compiled._fused_plans.values())
    assert_same(plain, compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_on_cuda(no_kernels):
    model = Layers().cuda()
    plain, compiled = compile_pair(model)
    run(model, (plain, compiled), steps=80)
    assert_same(plain, compiled)  # exact, through the kernel or (with a warning) the blocked update
