"""The training-time tracker: power-function EMAs of a model (and classic ones beside them), and their snapshots."""

from __future__ import annotations

import concurrent.futures
import contextlib
import fnmatch
import logging
import math
import operator
import os
import re
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from posthoc_ema import distributed, profiles
from posthoc_ema import fused as fusing
from posthoc_ema._version import __version__
from posthoc_ema.dtypes import dtype_name, parse_dtype
from posthoc_ema.errors import ModelChangedError, SnapshotError, SnapshotWriteError
from posthoc_ema.files import write_atomic
from posthoc_ema.schedules import PowerFunction, Schedule, to_metadata
from posthoc_ema.snapshots import (
    DEFAULT_PREFIX,
    ShardLayout,
    SnapshotInfo,
    TensorPlacement,
    check_prefix,
    list_snapshots,
    snapshot_name,
)
from posthoc_ema.writer import BackgroundWriter, FolderLock, release, write_error

if TYPE_CHECKING:
    from posthoc_ema.synthesis import StateDict

__all__ = ["PostHocEMA", "as_step", "clean_key"]

log = logging.getLogger(__name__)

STATE_FORMAT = "posthoc-ema/tracker"
STATE_VERSION = 1
EXISTING = ("error", "overwrite")
# A schedule's name goes into snapshot file names: the characters of a prefix.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def clean_key(key: str) -> str:
    """A ``state_dict`` key without the prefixes wrappers add.

    ``module.`` (DataParallel / DistributedDataParallel) at the front, and every
    ``_orig_mod.`` (``torch.compile``), so the key loads into the bare model.

    >>> clean_key("module._orig_mod.net.0.weight")
    'net.0.weight'
    """
    while True:
        if key.startswith("module."):
            key = key[len("module.") :]
        elif key.startswith("_orig_mod."):
            key = key[len("_orig_mod.") :]
        else:
            break
    return key.replace("._orig_mod.", ".")


def as_step(value: Any, *, name: str = "step") -> int:
    """``value`` as a Python int, if it is an integer of any kind (Python, NumPy, a 0-d torch tensor).

    Floats, even whole ones, and booleans are refused: a step is a count.

    Raises:
        ValueError: if ``value`` is not an integer.

    >>> as_step(np.int64(3)), as_step(torch.tensor(3))
    (3, 3)
    """
    is_bool = isinstance(value, bool | np.bool_) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    if not is_bool:
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"{name}={value!r} is not an integer; give an int (Python, NumPy or a 0-d integer tensor)")


def _as_sigma_rel(sigma_rel: Any) -> float:
    try:
        return float(sigma_rel)
    except (TypeError, ValueError):
        raise ValueError(f"sigma_rel={sigma_rel!r} is not a number") from None


def _check_names(schedules: Mapping[str, Schedule]) -> tuple[tuple[str, Schedule, str], ...]:
    """``(name, schedule, metadata spec)`` of each named schedule, checked."""
    checked: list[tuple[str, Schedule, str]] = []
    folded: dict[str, str] = {}
    for name, schedule in schedules.items():
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise ValueError(
                f"schedule name {name!r} is not valid: use a letter or digit, then letters, digits, '_', '.' "
                "or '-' (it goes into snapshot file names, e.g. 'timm')"
            )
        try:
            float(name)
        except ValueError:
            pass
        else:
            raise ValueError(
                f"schedule name {name!r} is a number, which would be read as a sigma_rel; use a word, e.g. 'timm'"
            )
        if name.lower() in folded:
            raise ValueError(
                f"schedule names {folded[name.lower()]!r} and {name!r} differ only in case; their snapshot "
                "files would collide on case-insensitive file systems"
            )
        folded[name.lower()] = name
        if not isinstance(schedule, Schedule):
            raise ValueError(
                f"schedules[{name!r}]={schedule!r} is not a schedule; give a posthoc_ema.schedules class "
                "instance, e.g. Constant(0.9999)"
            )
        if isinstance(schedule, PowerFunction):
            raise ValueError(
                f"schedules[{name!r}] is a power function; track it with sigma_rels=(..., "
                f"{float(schedule.sigma_rel)!r}), whose snapshots serve synthesis"  # type: ignore[arg-type]
            )
        checked.append((name, schedule, to_metadata(schedule)))
    return tuple(checked)


def _model_entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    entries: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        name = clean_key(key)
        if name in entries and entries[name] is not t:
            raise ValueError(
                f"two tensors of the model map to the state_dict key {name!r} once wrapper prefixes are removed"
            )
        entries[name] = t
    return entries


def _live(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The tensor ``module`` holds under ``name`` now (parameter or buffer), or None."""
    for holder in (module._parameters, module._buffers):
        if name in holder:
            return holder[name]
    return None


def _difference(old: torch.Tensor, new: torch.Tensor) -> str | None:
    """How ``new`` differs from ``old`` in what the EMA depends on, or None if it can take its place."""
    if tuple(new.shape) != tuple(old.shape):
        return f"shape {tuple(new.shape)} instead of {tuple(old.shape)}"
    if new.dtype != old.dtype:
        return f"dtype {new.dtype} instead of {old.dtype}"
    if new.device != old.device:
        return f"device {new.device} instead of {old.device}"
    return None


# -- following tensors the model replaces ------------------------------------------
#
# Assigning a parameter or buffer (`model.weight = nn.Parameter(...)`, `self.stat = ...`
# in forward, `load_state_dict(..., assign=True)`) goes through torch's global
# registration hooks. The hook only notes (module, name) for the trackers watching that
# module, so update() pays one emptiness test when nothing was assigned.

_WATCHERS: dict[int, weakref.WeakSet[PostHocEMA]] = {}  # id(module) -> trackers holding its tensors
_HOOKS: list[Any] = []


def _on_assign(module: torch.nn.Module, name: str, value: Any) -> None:
    watchers = _WATCHERS.get(id(module))
    if watchers:
        for tracker in list(watchers):
            tracker._assigned.append((id(module), name))


def _watch(tracker: PostHocEMA, modules: Iterable[torch.nn.Module]) -> None:
    if not _HOOKS:
        _HOOKS.append(register_module_parameter_registration_hook(_on_assign))
        _HOOKS.append(register_module_buffer_registration_hook(_on_assign))
    ids = sorted({id(m) for m in modules})
    for i in ids:
        _WATCHERS.setdefault(i, weakref.WeakSet()).add(tracker)
    weakref.finalize(tracker, _unwatch, ids)


def _unwatch(ids: list[int]) -> None:
    for i in ids:
        watchers = _WATCHERS.get(i)
        if watchers is not None and not any(True for _ in watchers):
            del _WATCHERS[i]


@dataclass
class _Group:
    """Averaged tensors that share a source device and dtype: one foreach call per EMA."""

    sources: list[torch.Tensor]
    emas: list[list[torch.Tensor]]  # [ema index][tensor]
    staging: list[torch.Tensor] | None  # source copies in the EMA dtype/device, when they differ
    sync_device: torch.device | None  # CUDA device to wait for before the CPU reads staging
    src_device: torch.device
    src_dtype: torch.dtype
    sentinel: int  # a parameter of the group: model.to() changes its device or dtype in place


@dataclass
class _Copied:
    """Non-floating tensors (integer buffers such as BatchNorm's counter): copied, shared by all EMAs."""

    sources: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Tracked:
    """One tracked tensor: its state_dict keys, where the model holds it, and its slot."""

    keys: list[str]
    homes: list[tuple[torch.nn.Module, str]]  # (module, attribute name); several when tied
    holder: _Group | _Copied
    index: int
    positions: list[int] = field(default_factory=list)  # its entries in the tracker's home lists
    dtensor: torch.Tensor | None = None  # the model's DTensor, whose local shard holder.sources[index] is

    @property
    def model_tensor(self) -> torch.Tensor:
        """The tensor the model holds: the DTensor of a sharded entry, else the source itself."""
        return self.dtensor if self.dtensor is not None else self.holder.sources[self.index]


def _staging_for(group: _Group, ema_device: torch.device, ema_dtype: torch.dtype) -> None:
    """Set the group's staging buffers for EMAs kept in ``ema_dtype`` on ``ema_device``."""
    direct = ema_device == group.src_device and ema_dtype == group.src_dtype
    pin = ema_device.type == "cpu" and group.src_device.type == "cuda"
    group.staging = None
    if not direct:
        group.staging = [
            torch.empty(t.shape, dtype=ema_dtype, device=ema_device, pin_memory=pin) for t in group.sources
        ]
    group.sync_device = group.src_device if pin else None


class PostHocEMA:
    """Power-function EMAs of a model's weights, with snapshots for post-hoc synthesis.

    Tracks one EMA per ``sigma_rel`` with the exact power-function update of EDM2
    (Karras et al. 2023, eq. 127): at time ``t`` after an update at ``t_prev``,
    ``ema = beta * ema + (1 - beta) * weights`` with
    ``beta = (t_prev / t)**(gamma + 1)``. The first update copies. Every
    ``snapshot_every`` steps each EMA is written to ``snapshot_dir`` as a
    self-describing safetensors file, in the background; after training,
    :func:`posthoc_ema.synthesize` turns them into the EMA of any ``sigma_rel``.

    Classic EMAs (timm, Composer, ema-pytorch, ...) are tracked beside them by
    name: ``schedules={"timm": Constant(0.9998)}``. Each applies, at an update at
    ``t`` after one at ``t_prev``, the decay ``schedule.beta(t, t_prev)`` of
    :mod:`posthoc_ema.schedules`, and starts as a copy of the weights when the
    tracker is created (updates at or before a schedule's ``start`` copy the
    weights again), exactly as :meth:`Schedule.weights` describes. A name works
    wherever a sigma_rel does (:meth:`ema_state_dict`, :meth:`copy_to`,
    :meth:`swapped`, :meth:`functional_call`); their snapshots, named
    ``<prefix>-<step>-<name>.safetensors``, record the schedule in their
    metadata, and synthesis uses them as extra basis profiles beside the
    power-function snapshots (their profile is known exactly; see
    :func:`posthoc_ema.synthesis.plan`, ``use_classic=``).

    Floating parameters and buffers are averaged in float32 (float64 ones in
    float64) whatever the model's dtype; other buffers are copied. Keys are the
    model's ``state_dict()`` keys without ``module.`` / ``_orig_mod.`` prefixes.

    Create the tracker after moving the model to its device and dtype, as you
    would an optimizer: it holds the model's tensors, not copies of the module.
    A tensor the model replaces by assignment (``model.weight = nn.Parameter(...)``,
    ``self.stat = ...`` in ``forward``, ``load_state_dict(sd, assign=True)``) is
    followed at the next :meth:`update` if it keeps its shape, dtype and device;
    otherwise :class:`~posthoc_ema.ModelChangedError` names it.

    Args:
        model: the model being trained.
        sigma_rels: relative widths of the tracked power-function EMAs, each in
            (0, sqrt(1/12)); may be empty (``()``) when ``schedules`` are given.
        schedules: classic EMAs to track too, by name (letters, digits, ``_``,
            ``.``, ``-``, not a number): ``{"timm": Constant(0.9998)}``.
        snapshot_dir: folder for snapshots; ``None`` tracks without writing any.
        snapshot_every: write snapshots whenever the step passes a multiple of
            this; ``None`` writes them only when :meth:`snapshot` is called.
        update_every: apply the EMA on every k-th :meth:`update` call (and at
            snapshot steps); the decay accounts for the skipped steps, so the
            EMA still has the requested profile.
        device: where to keep the EMAs (e.g. ``"cpu"`` for a model on a GPU);
            default: beside each tensor.
        snapshot_dtype: dtype floating tensors are stored in: float32 (default),
            bfloat16 or float16 to halve the disk. Never applied to counters.
        trainable_only: track only parameters with ``requires_grad`` (adapters,
            LoRA); buffers are then left out.
        exclude: glob patterns (``fnmatch``) of keys not to track, matched against
            keys without wrapper prefixes (``net.0.weight``, not ``module.net.0.weight``);
            a pattern that matches no key gives a warning.
        prefix: start of the snapshot file names, and the namespace of this
            tracker's snapshots in ``snapshot_dir``: trackers with different
            prefixes (a GAN's generator and discriminator) share a folder, and
            synthesis picks one with ``prefix=``.
        existing: what to do when ``snapshot_dir`` already holds snapshots of
            this prefix from another training run (checked at the first
            snapshot, so a :meth:`load_state_dict` before it resumes that run
            instead): ``"error"`` (default) refuses, ``"overwrite"`` deletes those
            snapshot files, and no other file.
        final_snapshot: whether :meth:`close` (and the end of a ``with`` block)
            snapshots the current step when it has no snapshot yet, so the end
            of training can be synthesized.
        rank0_only: under ``torch.distributed`` (DDP), keep the EMAs on rank 0
            only, to save their memory on the other ranks. By default every
            rank keeps them, so :meth:`swapped` evaluation works on every rank.
            With ``rank0_only=True`` the other ranks (the rank is read when the
            tracker is created) hold no EMA tensor: :meth:`update` only checks
            and counts the steps there (so every rank agrees on them),
            :meth:`snapshot`, :meth:`flush` and :meth:`close` work (only rank 0
            writes, as always), :meth:`state_dict` and :meth:`load_state_dict`
            carry the counters only (a state saved on rank 0 loads on every
            rank), and :meth:`ema_state_dict`, :meth:`copy_to`, :meth:`swapped`
            and :meth:`functional_call` raise ``ValueError``. Without an
            initialized process group it has no effect.
        gather_snapshots: for a sharded model (FSDP2), gather each snapshot with
            ``full_tensor()`` on every rank and write whole files from rank 0,
            instead of one shard file per rank (the default, with nothing
            gathered during training). Ignored for a model without DTensors.
        fused: update all the EMAs in one pass over the weights instead of one
            pass per EMA, with the same numbers bit for bit. ``True``: block by
            block (:class:`posthoc_ema.fused.BlockedLerp`); it needs no compiler.
            ``"compile"``: tensors of 64Ki elements or more through a kernel made
            by ``torch.compile`` that reads each weight once for every EMA
            (:class:`posthoc_ema.fused.CompiledLerp`), compiled at the first
            update (about 15 s, once per process), checked bit for bit against
            ``torch._foreach_lerp_`` on a probe, and replaced by ``True`` with one
            logged warning where it cannot be compiled or is not exact. On a CPU
            and a model of large tensors: about 0.94x / 0.87x the time of the
            plain update with 2 EMAs and 0.86x / 0.68x with 4; no faster on a
            model of many small ones (``docs/benchmarks.md``).

    Raises:
        ValueError: for a sigma_rel outside (0, sqrt(1/12)), repeated sigma_rels,
            no EMA at all, an invalid schedule name or a power function among the schedules,
            a non-positive ``snapshot_every`` or ``update_every``, a model with
            no floating tensor to track, a ``snapshot_dir`` that is a file, an
            invalid ``prefix``, ``existing`` or ``fused``, or a DTensor placed other than
            ``Shard(d)`` / ``Replicate()`` on a 1-D mesh spanning every rank.

    Sharded models (FSDP2's ``fully_shard``, whose parameters are DTensors):
    each rank keeps the EMAs of its local shards only, with no communication
    at updates, and writes one shard file per EMA per snapshot
    (``<prefix>-<step>-<sigma_rel>-rank<r>-of-<n>.safetensors``, placements in
    the metadata; rank 0's also holds the plain tensors, such as buffers); synthesis assembles
    whole tensors. Every rank must create the tracker (its run id is agreed then:
    a collective) and call the same :meth:`update` / :meth:`snapshot` / :meth:`close`
    sequence. With ``gather_snapshots=True`` the snapshots are gathered instead
    (``full_tensor()``, a collective on every rank at each snapshot) and rank 0
    writes whole files, as for DDP. Only 1-D meshes with ``Shard(d)`` or
    ``Replicate()`` placements are supported; anything else is refused at construction.

    One tracker writes into a folder (and prefix) at a time: a lock file
    ``.<prefix>.lock`` there is held while the tracker has a background writer
    (from its first snapshot to :meth:`close`, or until it is dropped), and a
    second tracker's first snapshot raises :class:`SnapshotError` saying the
    folder is in use. Each snapshot records the tracker's :attr:`run_id`.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> emas = PostHocEMA(model, sigma_rels=(0.05, 0.10))  # with snapshot_dir=, use `with ... as emas:`
        >>> for _ in range(3):
        ...     emas.update()  # after each optimizer step
        >>> emas.step
        3
        >>> sorted(emas.ema_state_dict(0.05))
        ['bias', 'weight']
        >>> from posthoc_ema.schedules import Constant
        >>> timm_like = PostHocEMA(model, sigma_rels=(), schedules={"timm": Constant(0.9998)})
        >>> timm_like.names
        ('timm',)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sigma_rels: Sequence[float] | float = (0.05, 0.10),
        *,
        schedules: Mapping[str, Schedule] | None = None,
        snapshot_dir: str | os.PathLike[str] | None = None,
        snapshot_every: int | None = 1000,
        update_every: int = 1,
        device: torch.device | str | None = None,
        snapshot_dtype: torch.dtype | str = torch.float32,
        trainable_only: bool = False,
        exclude: Iterable[str] = (),
        prefix: str = DEFAULT_PREFIX,
        existing: Literal["error", "overwrite"] = "error",
        final_snapshot: bool = True,
        rank0_only: bool = False,
        gather_snapshots: bool = False,
        fused: bool | Literal["compile"] = False,
    ) -> None:
        if isinstance(sigma_rels, torch.Tensor):
            sigma_rels = sigma_rels.detach().cpu().double().numpy()
        given = np.asarray(sigma_rels, dtype=np.float64).reshape(-1)  # a number, a sequence, an array
        sigmas = tuple(profiles.canonical_sigma_rel(s) for s in given)
        named = _check_names(schedules or {})
        if not sigmas and not named:
            raise ValueError(
                "sigma_rels is empty and no schedules are given; track at least one EMA, e.g. sigma_rels=(0.05, 0.10)"
            )
        gammas = profiles.sigma_rel_to_gamma(np.asarray(sigmas, dtype=np.float64))  # validates the range
        if len(set(sigmas)) != len(sigmas):
            raise ValueError(f"sigma_rels={sigmas} repeats a value (to {profiles.SIGMA_REL_DIGITS} significant digits)")
        for name, value in (("snapshot_every", snapshot_every), ("update_every", update_every)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r} is not a positive integer")
        if existing not in EXISTING:
            raise ValueError(f"existing={existing!r} is not one of {', '.join(map(repr, EXISTING))}")
        self.sigma_rels: tuple[float, ...] = sigmas
        self.gammas: tuple[float, ...] = tuple(float(g) for g in gammas)
        self._named = named  # (name, schedule, metadata spec); their EMAs come after the power functions'
        self._n_emas = len(sigmas) + len(named)
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.snapshot_every = snapshot_every
        self.update_every = update_every
        self.snapshot_dtype = parse_dtype(snapshot_dtype)
        self.prefix = check_prefix(prefix)
        self.existing = existing
        self.final_snapshot = bool(final_snapshot)
        self.gather_snapshots = bool(gather_snapshots)
        if fused not in (False, True, "compile"):
            raise ValueError(f"fused={fused!r} is not one of False, True, 'compile'")
        self.fused: bool | Literal["compile"] = "compile" if fused == "compile" else bool(fused)
        # group index -> its prepared blocks (or compiled chunks), built at the first update
        self._fused_plans: dict[int, fusing.BlockedLerp | fusing.CompiledLerp] = {}
        #: Identity of this training run, in every snapshot's metadata; kept by state_dict() and load_state_dict().
        self.run_id = uuid.uuid4().hex
        self.step = 0
        self._ema_step = 0  # time of the last EMA update
        self._calls = 0  # update() calls, for update_every
        self._snapshot_step = 0  # time of the last snapshot
        self._start_steps = [0] * len(sigmas)  # when each power-function EMA began: > 0 for one added on resume
        self._device = None if device is None else torch.device(device)
        #: Whether ``rank0_only=True`` was given; :attr:`holds_emas` says whether this rank keeps the EMAs.
        self.rank0_only = bool(rank0_only)
        self._holds_emas = not self.rank0_only or _is_writer_rank()
        self._rank = 0 if self._holds_emas else torch.distributed.get_rank()  # for the error on the other ranks
        self._build(model, trainable_only=trainable_only, exclude=tuple(exclude))
        if not self._holds_emas:
            self._copied.values = []  # the copied integer buffers: small, but EMA state all the same
        if self._layout is not None:  # every rank's shard files must carry one run id
            self.run_id = distributed.agree_run_id(self.run_id, self._layout)
        self._init_writing()
        if self.snapshot_dir is not None:
            try:
                self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise ValueError(
                    f"snapshot_dir={str(self.snapshot_dir)!r} is a file (or lies under one), not a folder; "
                    "give the path of a folder"
                ) from None

    # -- construction -------------------------------------------------------

    def _build(self, model: torch.nn.Module, *, trainable_only: bool, exclude: tuple[str, ...]) -> None:
        every = _model_entries(model)
        for pattern in exclude:
            if not any(fnmatch.fnmatchcase(k, pattern) for k in every):
                hint = " (keys have no 'module.' prefix)" if pattern.startswith(("module.", "_orig_mod.")) else ""
                warnings.warn(
                    f"exclude pattern {pattern!r} matches no key of the model{hint}; keys are matched without "
                    f"wrapper prefixes, e.g. {next(iter(every), '')!r}",
                    UserWarning,
                    stacklevel=3,
                )
        entries = {
            k: t
            for k, t in every.items()
            if not any(fnmatch.fnmatchcase(k, pattern) for pattern in exclude)
            and (not trainable_only or (isinstance(t, torch.nn.Parameter) and t.requires_grad))
        }
        #: How the DTensor entries are sharded (FSDP2); None for a model of plain tensors.
        self._layout = distributed.shard_layout(entries)
        if self._layout is not None and self.rank0_only:
            raise ValueError(
                "rank0_only=True keeps whole EMAs on rank 0, but this model is sharded (FSDP2): each rank holds "
                "the EMAs of its own shards; leave rank0_only off"
            )
        if not any(t.is_floating_point() for t in entries.values()):
            what = "no tensors" if not entries else "no floating tensor (only integer buffers)"
            raise ValueError(
                f"the model has {what} to track; an EMA averages floating parameters or buffers "
                "(check the model, trainable_only and exclude)"
            )
        self._keys = list(entries)
        self._sources = entries
        # Tied weights appear under several keys: track each tensor once.
        unique: dict[int, torch.Tensor] = {}
        for t in entries.values():
            unique.setdefault(id(t), t)
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self._copied = _Copied()
        self._slot: dict[int, tuple[Any, int]] = {}  # id(source) -> (group or _Copied, index)
        sharded = {id(t): t for t in unique.values() if self._layout is not None and _is_dtensor(t)}
        for model_tensor in unique.values():
            t = distributed.local_tensor(model_tensor)  # a DTensor's local shard is what this rank averages
            if t.is_floating_point():
                groups.setdefault((t.device, t.dtype), []).append(t)
            else:
                self._slot[id(t)] = (self._copied, len(self._copied.sources))
                self._copied.sources.append(t)
                self._copied.values.append(t.detach().to(self._device or t.device, copy=True))
        self._groups: list[_Group] = []
        for (src_device, src_dtype), sources in groups.items():
            ema_device = self._device or src_device
            ema_dtype = torch.promote_types(src_dtype, torch.float32)
            emas = [
                [
                    t.detach().to(device=ema_device, dtype=ema_dtype, copy=True, memory_format=torch.contiguous_format)
                    for t in sources
                ]
                for _ in range(self._n_emas if self._holds_emas else 0)  # rank0_only: none on other ranks
            ]
            sentinel = next((i for i, t in enumerate(sources) if isinstance(t, torch.nn.Parameter)), 0)
            group = _Group(sources, emas, None, None, src_device, src_dtype, sentinel)
            if self._holds_emas:
                _staging_for(group, ema_device, ema_dtype)
            for i, t in enumerate(sources):
                self._slot[id(t)] = (group, i)
            self._groups.append(group)
        for tid, t in sharded.items():  # looked up by the model's tensor (the DTensor), as the plain ones
            self._slot[tid] = self._slot.pop(id(distributed.local_tensor(t)))
        # Where the model holds each tracked tensor, to follow assignments and to
        # check at snapshots that nothing was replaced behind the hooks' back
        # (model.to() writes module._buffers directly).
        keys_of: dict[int, list[str]] = {}
        for k, t in entries.items():
            keys_of.setdefault(id(t), []).append(k)
        homes: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        for module in model.modules():
            for holder in (module._parameters, module._buffers):
                for name, held in holder.items():
                    if held is not None and id(held) in keys_of:
                        homes.setdefault(id(held), []).append((module, name))
        # A floating entry the model does not hold is a copy made by state_dict()
        # (FSDP's full state dict gathers one): averaging it would freeze the EMA.
        copies = [keys_of[tid][0] for tid, t in unique.items() if tid not in homes and t.is_floating_point()]
        if copies:
            raise ValueError(
                f"the model's state_dict() gives {copies[0]!r} as a tensor that no module of the model holds (a copy, "
                "as FSDP's full state dict gathers), so its EMA would never change; give PostHocEMA the model whose "
                "parameters are trained (unsharded), or leave such entries out with exclude="
            )
        self._tracked: list[_Tracked] = []
        for tid in unique:
            holder, index = self._slot[tid]
            self._tracked.append(_Tracked(keys_of[tid], homes.get(tid, []), holder, index, dtensor=sharded.get(tid)))
        self._sharded = [r for r in self._tracked if r.dtensor is not None]
        self._assigned: list[tuple[int, str]] = []  # (id(module), name) assigned since the last update
        self._model_arg: torch.nn.Module | None = None  # the last module update() accepted
        self._index_homes()
        # What a snapshot copies: every floating entry into one flat buffer (one
        # foreach copy), the few others one by one. A sharded model's rank writes its
        # shards, and rank 0 also the plain (replicated) tensors.
        layout = self._layout
        written = [
            k
            for k in self._keys
            if layout is None
            or self.gather_snapshots
            or layout.rank == 0
            or (k in layout.placements and layout.placements[k].placement != "Replicate()")
        ]
        self._floating_keys = [k for k in written if self._sources[k].is_floating_point()]
        self._other_keys = [k for k in written if not self._sources[k].is_floating_point()]
        self._floating_numels = [distributed.local_tensor(self._sources[k]).numel() for k in self._floating_keys]
        self._flatten()

    def _index_homes(self) -> None:
        """Look-ups of where the model holds each tracked tensor, and the hooks that watch them."""
        self._by_home = {(id(module), name): r for r in self._tracked for module, name in r.homes}
        self._home_modules = {id(module) for r in self._tracked for module, _ in r.homes}
        # Parallel lists for the check at snapshots: one pass of C-level map() calls.
        self._home_dicts: list[dict[str, Any]] = []
        self._home_names: list[str] = []
        self._home_expected: list[torch.Tensor] = []
        for record in self._tracked:
            record.positions = []
            for module, name in record.homes:
                record.positions.append(len(self._home_names))
                self._home_dicts.append(module._parameters if name in module._parameters else module._buffers)
                self._home_names.append(name)
                self._home_expected.append(record.model_tensor)
        _watch(self, (module for r in self._tracked for module, _ in r.homes))

    def _flatten(self) -> None:
        self._flat_emas = [
            [t.view(-1) for _, t in self._ema_items_of(index, self._floating_keys)]
            for index in range(self._n_emas if self._holds_emas else 0)
        ]

    # -- following the model ------------------------------------------------

    def _follow(self, records: Iterable[_Tracked]) -> None:
        """Re-bind each record whose home now holds another tensor, or raise if it cannot be followed."""
        for record in records:
            old = record.model_tensor
            lives = [_live(module, name) for module, name in record.homes]
            if record.dtensor is not None:
                # Between forward and backward (reshard_after_forward=False, unshard()) FSDP2 puts its
                # unsharded parameter, a plain tensor, where the DTensor was; the DTensor stays the
                # sharded parameter the optimizer steps, and comes back: nothing to follow.
                lives = [old if t is not None and not _is_dtensor(t) else t for t in lives]
            if all(t is old for t in lives):
                continue
            key = record.keys[0]
            new = lives[0]
            if new is None or any(t is None for t in lives):
                raise ModelChangedError(
                    f"the model's tensor {key!r} was removed since PostHocEMA was created; "
                    "create the tracker for the model as it is trained"
                )
            if any(t is not new for t in lives):
                raise ModelChangedError(
                    f"the model's tied tensor {key!r} (also {', '.join(map(repr, record.keys[1:]))}) was replaced "
                    "in some of its places but not all, so it is no longer one tensor; keep tied weights tied"
                )
            problem = _difference(old, new)
            if problem is None and record.dtensor is not None:
                problem = _sharding_difference(old, new)
            if problem is not None:
                hint = (
                    "load weights of the tracked shapes"
                    if problem.startswith("shape")
                    else "create PostHocEMA after model.to(...), or load weights with load_state_dict(sd) "
                    "without assign=True, which keeps the model's dtype and device"
                )
                raise ModelChangedError(
                    f"the model's tensor {key!r} was replaced by one with {problem}; the EMA can follow a "
                    f"replaced tensor only if it keeps its shape, dtype and device ({hint})"
                )
            record.holder.sources[record.index] = distributed.local_tensor(new)
            self._fused_plans.clear()  # their views are of the old tensor
            if record.dtensor is not None:
                record.dtensor = new
            for position, (module, name) in zip(record.positions, record.homes, strict=True):
                self._home_expected[position] = new
                self._home_dicts[position] = module._parameters if name in module._parameters else module._buffers
            del self._slot[id(old)]
            self._slot[id(new)] = (record.holder, record.index)
            for k in record.keys:
                self._sources[k] = new

    def _follow_assigned(self) -> None:
        # Forget the assignments only once followed: an error is raised again at the next update.
        seen = len(self._assigned)
        records = {id(r): r for home in self._assigned[:seen] if (r := self._by_home.get(home)) is not None}
        self._follow(records.values())
        del self._assigned[:seen]

    # -- training -------------------------------------------------------------

    @torch.no_grad()
    def update(self, model_or_step: torch.nn.Module | int | None = None, /, *, step: int | None = None) -> None:
        """Record the model's current weights; call after each optimizer step.

        ``update()``, ``update(step)``, ``update(step=step)``, and timm's style
        ``update(model)`` or ``update(model, step=step)`` all work; a model passed
        must be the tracked one (or a wrapper of it, or the module it wraps).

        Args:
            model_or_step: the tracked model (ignored beyond that check) or the step.
            step: the training time now (samples, tokens, ...), an integer of any
                kind greater than the previous one; default: the previous step + 1.

        Raises:
            ValueError: if ``step`` is not an integer or does not increase, or the
                model passed is not the tracked one (nothing is recorded).
            ModelChangedError: if a tracked tensor was replaced by one of another
                shape, dtype or device, or the model was moved.
            SnapshotWriteError: if earlier background snapshot writes failed,
                naming them. The step is recorded and its snapshot, if due,
                queued before this is raised: a caller may catch it and go on.
            SnapshotError: at the first snapshot, if the folder is in use by
                another tracker or holds another run's snapshots.

        Example:
            >>> model = torch.nn.Linear(2, 1)
            >>> emas = PostHocEMA(model, sigma_rels=0.1)
            >>> emas.update(model, step=np.int64(10))
            >>> emas.step
            10
        """
        if isinstance(model_or_step, torch.nn.Module):
            self._check_model_arg(model_or_step)
        elif model_or_step is not None:
            if step is not None:
                raise ValueError(f"step given twice: update({model_or_step!r}, step={step!r})")
            step = model_or_step
        if step is None:
            step = self.step + 1
        else:
            step = as_step(step)
            if step <= self.step:
                raise ValueError(f"step={step!r} must be an integer greater than the previous step {self.step}")
        if self._assigned:
            self._follow_assigned()
        previous, calls = self.step, self._calls
        self.step = step
        try:
            due = self._snapshot_due()
            if due:  # the full check, for replacements no hook sees (model.to() writes module._buffers)
                self._check_sources()
            self._calls += 1
            if due or self._calls % self.update_every == 0:
                self._apply()
        except BaseException:  # nothing of this step is recorded: the caller may fix the model and go on
            self.step, self._calls = previous, calls
            raise
        if due:
            self._write_snapshots()
        if self._writer is not None:  # after this step's work, so a caller who catches this loses no step
            self._writer.check()

    def _check_model_arg(self, model: torch.nn.Module) -> None:
        if model is self._model_arg:
            return
        inside = {id(m) for m in model.modules()}
        if not self._home_modules <= inside:
            raise ValueError(
                f"update() was given a {type(model).__name__} that does not hold the tracked tensors; pass the "
                "model this PostHocEMA was created for (or call update() without it)"
            )
        self._model_arg = model

    def _snapshot_due(self) -> bool:
        every = self.snapshot_every
        return self.snapshot_dir is not None and every is not None and self.step // every > self._snapshot_step // every

    def _follow_local_shards(self) -> None:
        """Re-read each DTensor's local shard: FSDP2 may re-create it (lazy init, ``reset_sharded_param``)."""
        for record in self._sharded:
            assert record.dtensor is not None
            local, old = distributed.local_tensor(record.dtensor), record.holder.sources[record.index]
            if local is old:
                continue
            problem = _difference(old, local)
            if problem is not None:
                raise ModelChangedError(
                    f"the local shard of the model's DTensor {record.keys[0]!r} was replaced by one with {problem}; "
                    "create PostHocEMA after fully_shard(...) and model.to(...)"
                )
            record.holder.sources[record.index] = local
            self._fused_plans.clear()  # their views are of the old shard

    def _apply(self) -> None:
        if not self._holds_emas:  # rank0_only on another rank: nothing to average, only the step to record
            self._ema_step = self.step
            return
        if self._sharded:
            self._follow_local_shards()
        for group in self._groups:
            sentinel = group.sources[group.sentinel]
            if sentinel.device != group.src_device or sentinel.dtype != group.src_dtype:
                self._check_moves()  # raises, naming the tensor
        step, prev = self.step, self._ema_step
        # EDM2 eq. 127 in Python floats: no tensor is read on the host, so no sync. The
        # schedules' decays are NumPy scalars of Python numbers: O(#EMAs), no tensor either.
        weights = [1.0 - (prev / step) ** (g + 1) for g in self.gammas]
        weights += [1.0 - float(schedule.beta(step, prev)) for _, schedule, _ in self._named]
        try:
            for number, group in enumerate(self._groups):
                sources = group.sources
                if group.staging is not None:
                    torch._foreach_copy_(group.staging, sources, non_blocking=group.sync_device is not None)
                    if group.sync_device is not None:
                        torch.cuda.current_stream(group.sync_device).synchronize()
                    sources = group.staging
                if self.fused:
                    plan = self._fused_plans.get(number)
                    if plan is None or not plan.matches(sources, group.emas):
                        plan = fusing.plan(sources, group.emas, compile=self.fused == "compile")
                        self._fused_plans[number] = plan
                    plan(weights)
                    continue
                for emas, weight in zip(group.emas, weights, strict=True):
                    torch._foreach_lerp_(emas, sources, weight)
            if self._copied.sources:
                torch._foreach_copy_(self._copied.values, self._copied.sources)
        except RuntimeError as err:
            self._check_moves()  # a clearer error, if that is the cause
            raise ModelChangedError(
                f"could not update the EMAs ({err}); if the model was moved to another device or dtype "
                "after PostHocEMA was created, create it after model.to(...)"
            ) from err
        self._ema_step = step

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        non_blocking: bool = False,
    ) -> PostHocEMA:
        """Move the EMAs to ``device`` and/or keep their floating tensors in ``dtype``.

        As diffusers' ``EMAModel.to`` (``src/diffusers/training_utils.py``):
        floating EMAs take ``device`` and ``dtype``, copied integer buffers only
        ``device``. The model stays where it is: later updates copy its weights
        to the EMAs' device. ``dtype`` is the dtype the EMAs are averaged in
        (float32 by default; float64 for more precision, bfloat16 to save memory at
        the cost of accuracy). Snapshots are still written in ``snapshot_dtype``.

        Args:
            device: where to keep the EMAs; None leaves them where they are.
            dtype: a floating dtype for the EMAs; None leaves it as it is.
            non_blocking: passed to :meth:`torch.Tensor.to`.

        Returns:
            This tracker.

        Raises:
            ValueError: if ``dtype`` is not a floating dtype.

        Example:
            >>> emas = PostHocEMA(torch.nn.Linear(2, 1), sigma_rels=0.1).to("cpu", torch.float64)
            >>> emas.ema_state_dict(0.1)["weight"].dtype
            torch.float64
        """
        new_device = None if device is None else torch.device(device)
        new_dtype = (
            None if dtype is None else (dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype, None))
        )
        if dtype is not None and (not isinstance(new_dtype, torch.dtype) or not new_dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} is not a floating dtype; the EMAs are averages (e.g. torch.float32)")
        if not self._holds_emas:
            return self
        for group in self._groups:
            ema_device = new_device or group.emas[0][0].device
            ema_dtype = new_dtype or group.emas[0][0].dtype
            group.emas = [
                [t.to(device=ema_device, dtype=ema_dtype, non_blocking=non_blocking) for t in emas]
                for emas in group.emas
            ]
            _staging_for(group, ema_device, ema_dtype)
        self._fused_plans.clear()  # let go of the old EMAs' views now
        if new_device is not None:
            self._copied.values = [t.to(new_device, non_blocking=non_blocking) for t in self._copied.values]
            self._device = new_device
        self._flatten()
        return self

    # -- reading the EMAs -----------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the tracked classic EMAs, in the order given."""
        return tuple(name for name, _, _ in self._named)

    @property
    def schedules(self) -> dict[str, Schedule]:
        """The tracked classic EMAs' schedules by name (a copy)."""
        return {name: schedule for name, schedule, _ in self._named}

    def _tracked_list(self) -> str:
        return ", ".join([*map(repr, self.sigma_rels), *map(repr, self.names)]) or "nothing"

    @property
    def holds_emas(self) -> bool:
        """Whether this process keeps the EMAs: False only on ranks other than 0 with ``rank0_only=True``."""
        return self._holds_emas

    def _check_holds(self) -> None:
        if not self._holds_emas:
            raise ValueError(
                f"this is rank {self._rank}, and rank0_only=True keeps the EMAs on rank 0 only; "
                "read them on rank 0, or create PostHocEMA without rank0_only to keep them on every rank"
            )

    def _index(self, sigma_rel: float | str) -> int:
        """The EMA index of a schedule name (a str) or a sigma_rel (a number, matched by profiles.same_sigma_rel)."""
        self._check_holds()
        if isinstance(sigma_rel, str):
            for i, name in enumerate(self.names):
                if name == sigma_rel:
                    return len(self.sigma_rels) + i
            try:
                float(sigma_rel)
            except ValueError:
                raise ValueError(
                    f"sigma_rel={sigma_rel!r} is not a number, nor the name of a tracked schedule; "
                    f"tracked: {self._tracked_list()}"
                ) from None
        value = _as_sigma_rel(sigma_rel)
        for i, s in enumerate(self.sigma_rels):
            if profiles.same_sigma_rel(s, value):
                return i
        raise ValueError(
            f"sigma_rel={profiles.canonical_sigma_rel(value)!r} is not tracked; tracked: {self._tracked_list()}"
        )

    def _ema_items(self, index: int) -> Iterator[tuple[str, torch.Tensor]]:
        return self._ema_items_of(index, self._keys)

    def _ema_items_of(self, index: int, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            holder, i = self._slot[id(self._sources[key])]
            yield key, holder.emas[index][i] if isinstance(holder, _Group) else holder.values[i]

    def ema_state_dict(self, sigma_rel: float | str) -> dict[str, torch.Tensor]:
        """A copy of the EMA of ``sigma_rel`` (or of the schedule of that name) as it stands.

        Floating entries are in float32 or wider. With ``update_every > 1`` this
        is the EMA at its last update, :attr:`ema_step`. ``sigma_rel`` may be any
        number (NumPy, 0-d tensor); it matches a tracked one to 6 significant
        digits. A str is the name of a tracked schedule.

        For a sharded model (FSDP2), a DTensor entry comes back as a DTensor of
        the same placement and global shape whose local tensor is a copy of this
        rank's EMA shard, as ``model.state_dict()`` gives it (no communication;
        ``.full_tensor()`` on every rank gathers it); plain entries are plain tensors.

        Raises:
            ValueError: if ``sigma_rel`` is not tracked, or no schedule has that name.
        """
        return {
            k: distributed.as_dtensor(t.detach().clone(), self._sources[k])
            if _is_dtensor(self._sources[k])
            else t.detach().clone()
            for k, t in self._ema_items(self._index(sigma_rel))
        }

    @property
    def ema_step(self) -> int:
        """The step of the EMAs' last update (equals :attr:`step` when ``update_every == 1``)."""
        return self._ema_step

    def _target(self, model: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
        """The model's tensors the EMA ``index`` goes into, checked before anything is written."""
        entries = _model_entries(model)
        missing = [k for k in self._keys if k not in entries]
        if missing:
            raise ValueError(f"the model lacks {len(missing)} tracked tensors, e.g. {missing[:3]}")
        target = {k: entries[k] for k in self._keys}
        for key, value in self._ema_items(index):
            dest = target[key]
            if _is_dtensor(dest) and _is_dtensor(self._sources[key]):  # a sharded model: this rank's shard
                problem = _sharding_difference(self._sources[key], dest)
                if problem is not None:
                    raise ValueError(f"the model's {key!r} is sharded with {problem}; nothing was copied")
                dest = target[key] = distributed.local_tensor(dest)
            if tuple(dest.shape) != tuple(value.shape):
                raise ValueError(
                    f"the model's {key!r} has shape {tuple(dest.shape)}, the EMA's {tuple(value.shape)}; "
                    "nothing was copied"
                )
            if not torch.can_cast(value.dtype, dest.dtype):
                raise ValueError(
                    f"the model's {key!r} is {dest.dtype}, which the EMA's {value.dtype} cannot be cast to; "
                    "nothing was copied"
                )
            if dest.device.type == "meta":
                raise ValueError(f"the model's {key!r} is on the meta device, which holds no data; nothing was copied")
        return target

    def copy_to(self, model: torch.nn.Module, sigma_rel: float | str) -> None:
        """Load the EMA of ``sigma_rel`` (or of the schedule of that name) into ``model`` (in its own dtype and device).

        Every tensor is checked first, so on an error the model is left untouched.
        For a sharded model (FSDP2) each rank copies its EMA shards into its local
        shards, after resharding the FSDP modules (``reshard()``, no communication)
        so that the next forward all-gathers them: call it on every rank, outside
        forward and backward.

        Raises:
            ValueError: if ``sigma_rel`` (or name) is not tracked, or the model lacks a tracked
                tensor or has one of another shape or of a dtype the EMA cannot be
                cast to.
        """
        index = self._index(sigma_rel)
        target = self._target(model, index)
        if self._layout is not None:
            distributed.reshard(model)  # the next forward all-gathers the EMA's shards
        self._load_into(target, index)

    @torch.no_grad()
    def _load_into(self, target: dict[str, torch.Tensor], index: int) -> None:
        for key, value in self._ema_items(index):
            target[key].copy_(value)

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module, sigma_rel: float | str) -> Iterator[torch.nn.Module]:
        """Temporarily put the EMA of ``sigma_rel`` (or of a schedule, by name) into ``model``, e.g. to evaluate it.

        The model's own tensors are restored bit for bit on exit, also when the
        block raises. Every tensor is checked before the first is touched.

        Raises:
            ValueError: as :meth:`copy_to`, before the model is touched.

        Example:
            >>> model = torch.nn.Linear(2, 1)
            >>> emas = PostHocEMA(model, sigma_rels=0.1)
            >>> emas.update()
            >>> with emas.swapped(model, sigma_rel=0.1):
            ...     pass  # evaluate(model)
        """
        index = self._index(sigma_rel)
        target = self._target(model, index)
        backup = {k: t.detach().clone() for k, t in target.items()}
        try:
            if self._layout is not None:
                distributed.reshard(model)  # the next forward all-gathers the EMA's shards
            self._load_into(target, index)
            yield model  # in the caller's grad mode
        finally:
            if self._layout is not None:
                distributed.reshard(model)  # and after the block, the model's own
            with torch.no_grad():
                for key, saved in backup.items():
                    target[key].copy_(saved)

    def functional_call(
        self,
        model: torch.nn.Module,
        sigma_rel: float | str,
        args: Any,
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run ``model`` with the weights of an EMA, without swapping them in or copying the model.

        Through :func:`torch.func.functional_call`: the model's own tensors are
        neither read nor changed, so this is ema-pytorch's ``ema(x)`` without a
        second model in memory. Each EMA tensor is cast to the dtype and device
        of the model's tensor it stands for (an EMA is float32 while the model may
        be bfloat16): the tensors that already match are used as they are, the
        others are cast copies for the call's duration. Tensors the tracker does
        not hold (non-persistent buffers, ``exclude``d or frozen ones with
        ``trainable_only``) are the model's own. The call runs in the caller's
        grad mode; the EMA tensors never require grad.

        Args:
            model: the tracked model (or a wrapper of it, or the module it wraps).
            sigma_rel: a tracked sigma_rel, or a schedule's name.
            args: the positional arguments of ``model``'s forward (a tuple, or one argument).
            kwargs: its keyword arguments.

        Returns:
            What ``model(*args, **kwargs)`` returns with the EMA's weights.

        Raises:
            ValueError: as :meth:`copy_to`, before the model is run; for a sharded
                model (FSDP2), whose forward ignores swapped-in tensors (use :meth:`swapped`).

        Example:
            >>> model = torch.nn.Linear(2, 1)
            >>> emas = PostHocEMA(model, sigma_rels=0.1)
            >>> emas.update()
            >>> emas.functional_call(model, 0.1, (torch.ones(3, 2),)).shape
            torch.Size([3, 1])
        """
        index = self._index(sigma_rel)
        if self._layout is not None:
            raise ValueError(
                "functional_call() cannot run a sharded model (FSDP2) with the EMA's weights: its forward "
                "all-gathers FSDP's own parameters; use `with emas.swapped(model, sigma_rel):` on every rank"
            )
        self._target(model, index)  # checks names, shapes, dtypes and devices
        ema = dict(self._ema_items(index))
        tensors: dict[str, torch.Tensor] = {}
        for key, dest in model.state_dict(keep_vars=True).items():
            value = ema.get(clean_key(key))
            if value is not None:
                tensors[key] = value.to(device=dest.device, dtype=dest.dtype)
        return torch.func.functional_call(model, tensors, args, dict(kwargs or {}))

    # -- snapshots ------------------------------------------------------------

    def _check_sources(self) -> None:
        """Check that the model still holds every tracked tensor; follow replaced ones, raise for the others."""
        seen = len(self._assigned)
        held = map(dict.get, self._home_dicts, self._home_names)
        if any(map(operator.is_not, held, self._home_expected)):
            self._check_moves()  # first: model.to() changes parameters in place and replaces buffers
            self._follow(self._tracked)
        del self._assigned[:seen]

    def _check_moves(self) -> None:
        """Raise, naming it, if a tracked tensor's device or dtype changed in place (model.to())."""
        for group in self._groups:
            for t in group.sources:
                if t.device != group.src_device or t.dtype != group.src_dtype:
                    key = next(r.keys[0] for r in self._tracked if r.holder is group and r.holder.sources[r.index] is t)
                    raise ModelChangedError(
                        f"the model's tensor {key!r} moved from {group.src_device} {group.src_dtype} to "
                        f"{t.device} {t.dtype} since PostHocEMA was created (model.to() or an assignment to "
                        "its .data); create PostHocEMA after moving the model"
                    )

    def snapshot(self) -> list[Path]:
        """Write a snapshot of every EMA now, in the background.

        If ``update_every`` skipped the latest steps, the EMAs are first brought up
        to :attr:`step` with the model's current weights.

        Returns:
            The paths the snapshots will have once written (see :meth:`flush`).

        Raises:
            ValueError: if the tracker has no ``snapshot_dir`` or no update yet.
            SnapshotWriteError: if earlier background writes failed, naming
                them; nothing is snapshotted then (call again to snapshot).
            SnapshotError: at the first snapshot, if the folder is in use by
                another tracker or holds another run's snapshots.
        """
        if self.snapshot_dir is None:
            raise ValueError("this PostHocEMA has no snapshot_dir; pass snapshot_dir= to write snapshots")
        if self.step == 0:
            raise ValueError("nothing to snapshot: call update() after an optimizer step first")
        if self._writer is not None:
            self._writer.check()
        if self._ema_step < self.step:
            self._check_sources()  # before averaging: a tensor replaced behind the hooks must not be read
            with torch.no_grad():
                self._apply()
        return self._write_snapshots()

    @property
    def _shard_files(self) -> ShardLayout | None:
        """What each of this rank's shard files holds, when snapshots are written one file per rank; else None."""
        layout = self._layout
        if layout is None or self.gather_snapshots:
            return None
        whole = TensorPlacement  # plain tensors are kept alike on every rank
        return ShardLayout(
            layout.rank,
            layout.world_size,
            {
                k: layout.placements.get(k)
                or whole("Replicate()", tuple(self._sources[k].shape), (0,) * self._sources[k].dim())
                for k in [*self._floating_keys, *self._other_keys]
            },
        )

    def _write_snapshots(self) -> list[Path]:
        assert self.snapshot_dir is not None
        self._check_sources()
        shard = self._shard_files
        where = None if shard is None else (shard.rank, shard.world_size)
        infos = [
            SnapshotInfo(
                path=self.snapshot_dir / snapshot_name(self._ema_step, sigma_rel, self.prefix, shard=where),
                step=self._ema_step,
                sigma_rel=sigma_rel,
                gamma=gamma,
                dtype=dtype_name(self.snapshot_dtype),
                update_every=self.update_every,
                library_version=__version__,
                run_id=self.run_id,
                prefix=self.prefix,
                start_step=start_step or None,
                shard=shard,
            )
            for sigma_rel, gamma, start_step in zip(self.sigma_rels, self.gammas, self._start_steps, strict=True)
        ] + [
            SnapshotInfo(
                path=self.snapshot_dir / snapshot_name(self._ema_step, name, self.prefix, shard=where),
                step=self._ema_step,
                sigma_rel=math.nan,
                gamma=math.nan,
                dtype=dtype_name(self.snapshot_dtype),
                update_every=self.update_every,
                library_version=__version__,
                run_id=self.run_id,
                prefix=self.prefix,
                name=name,
                schedule=spec,
                shard=shard,
            )
            for name, _, spec in self._named
        ]
        if self._layout is not None and self.gather_snapshots:  # a collective: every rank, before any can raise
            gathered = [self._gather(index) for index in range(self._n_emas)]
            if _is_writer_rank():
                writer = self._start_writing()
                for info, tensors in zip(infos, gathered, strict=True):
                    writer.submit(info.path, self._stage_whole(tensors, info))
            self._snapshot_step = self._ema_step
        elif shard is not None or _is_writer_rank():
            writer = self._start_writing()  # raises before anything is staged
            # Stage every EMA before the first write starts, so the copies do not
            # compete with the writer for memory bandwidth.
            jobs = [self._stage(index, info) for index, info in enumerate(infos)]
            self._snapshot_step = self._ema_step
            for info, (job, flat) in zip(infos, jobs, strict=True):
                self._buffers.append((writer.submit(info.path, job), flat))
            # Keep one idle buffer per EMA; drop the extras a slow disk made.
            idle = [b for b in self._buffers if b[0].done()][self._n_emas :]
            self._buffers = [b for b in self._buffers if not any(b is i for i in idle)]
        else:
            self._snapshot_step = self._ema_step
        return [info.path for info in infos]

    def _stage(self, index: int, info: SnapshotInfo) -> tuple[Callable[[], None], torch.Tensor]:
        """Copy EMA ``index`` to the CPU in the snapshot dtype now; return the job that writes it, and its buffer.

        The floating entries go into one flat buffer with one foreach copy; the
        buffer is reused once written (a fresh buffer of that size would be
        page-faulted in at every snapshot). The job holds no reference to the
        tracker, so a dropped tracker is collected even while it writes.
        """
        flat = next((b for f, b in self._buffers if f.done()), None)
        if flat is None:
            flat = torch.empty(sum(self._floating_numels), dtype=self.snapshot_dtype)
        else:
            self._buffers = [(f, b) for f, b in self._buffers if b is not flat]
        parts = torch.split(flat, self._floating_numels)
        torch._foreach_copy_(parts, self._flat_emas[index])
        keys = self._floating_keys
        shapes = [distributed.local_tensor(self._sources[k]).shape for k in keys]
        others = {k: t.to("cpu", copy=True) for k, t in self._ema_items_of(index, self._other_keys)}
        if self.snapshot_dtype == torch.float16:
            others |= self._too_wide_for_float16(index, parts, info.path)
        path, metadata = info.path, info.metadata()

        def write() -> None:
            named = {k: p.view(shape) for k, p, shape in zip(keys, parts, shapes, strict=True)}
            write_atomic(path, named | others, metadata)

        return write, flat

    def _gather(self, index: int) -> dict[str, torch.Tensor]:
        """EMA ``index`` with every DTensor entry gathered whole (``full_tensor()``: a collective, on every rank)."""
        return {
            k: distributed.full_tensor(t, self._sources[k]) if _is_dtensor(self._sources[k]) else t
            for k, t in self._ema_items(index)
        }

    def _stage_whole(self, tensors: Mapping[str, torch.Tensor], info: SnapshotInfo) -> Callable[[], None]:
        """The job that writes gathered whole tensors, copied to the CPU in the snapshot dtype now."""
        staged: dict[str, torch.Tensor] = {}
        for k, t in tensors.items():
            if not t.is_floating_point():
                staged[k] = t.to("cpu", copy=True)
                continue
            stored = t.to("cpu", dtype=self.snapshot_dtype, copy=True)
            if self.snapshot_dtype == torch.float16 and bool(stored.isinf().any()) and not bool(t.isinf().any()):
                stored = t.to("cpu", copy=True)  # overflows float16: kept in its own dtype, as _stage does
            staged[k] = stored
        path, metadata = info.path, info.metadata()

        def write() -> None:
            write_atomic(path, staged, metadata)

        return write

    def _too_wide_for_float16(self, index: int, parts: Sequence[torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        """The EMA tensors that overflowed float16 (to inf), copied in their own float32/64 to be stored so."""
        # One pass over the staged copy; per tensor only when something overflowed.
        if len(parts) == 0 or not torch.cat([p.isinf().any().view(1) for p in parts]).any():
            return {}
        keys = [k for k, p in zip(self._floating_keys, parts, strict=True) if p.isinf().any()]
        wide = {k: t.to("cpu", copy=True) for k, t in self._ema_items_of(index, keys)}
        if not set(keys) <= self._warned_wide:
            self._warned_wide |= set(keys)
            log.warning(
                "%s: %d tensors exceed float16's range (largest %g) and are stored in float32 instead: %s",
                path,
                len(keys),
                max(float(t.abs().max()) for t in wide.values()),
                ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else ""),
            )
        return wide

    # -- lifecycle --------------------------------------------------------------

    # The background writing's state; set by _init_writing, never pickled.
    _writer: BackgroundWriter | None
    _lock: FolderLock | None
    _finalizer: weakref.finalize[Any, Any] | None
    # (future of the write, staging buffer it reads): buffers are reused once their write is done.
    _buffers: list[tuple[concurrent.futures.Future[None], torch.Tensor]]
    _folder_checked: bool  # whether the folder holds no other run's snapshots (or they are gone)
    _legacy_resume: bool  # resumed from a state without a run id: run-less snapshots are ours
    _warned_wide: set[str]  # tensors already named in the float16 overflow warning

    def _init_writing(self) -> None:
        self._writer = self._lock = self._finalizer = None
        self._buffers = []
        self._folder_checked = self._legacy_resume = False
        self._warned_wide = set()

    def _start_writing(self) -> BackgroundWriter:
        """The background writer, started with the folder's lock and its check for other runs' snapshots."""
        if self._writer is not None:
            return self._writer
        assert self.snapshot_dir is not None
        shard = self._shard_files  # then every rank writes: a lock of its own
        lock = FolderLock(
            self.snapshot_dir, f".{self.prefix}.lock" if shard is None else f".{self.prefix}-rank{shard.rank:05d}.lock"
        )
        lock.acquire()
        try:
            if not self._folder_checked:
                self._check_folder()
                self._folder_checked = True
        except BaseException:
            lock.release()
            raise
        self._writer, self._lock = BackgroundWriter(), lock
        # A dropped tracker finishes its writes and frees the thread and the lock; the
        # finalizer holds the writer and the lock, never the tracker.
        self._finalizer = weakref.finalize(self, release, self._writer, lock)
        return self._writer

    def _check_folder(self) -> None:
        assert self.snapshot_dir is not None
        theirs = [
            info
            for info in list_snapshots(
                self.snapshot_dir, prefix=self.prefix, include_classic=True, skip_unreadable=True
            )
            if info.run_id != self.run_id and not (info.run_id is None and self._legacy_resume)
        ]
        if not theirs:
            return
        shard = self._shard_files
        if shard is not None and self.existing != "error":  # each rank deletes its part of them
            theirs = [i for i in theirs if (i.shard.rank if i.shard is not None else 0) == shard.rank]
            if not theirs:
                return
        if self.existing == "error":
            runs = len({info.run_id for info in theirs})
            whose = "another training run" if runs == 1 else f"{runs} other training runs"
            files = f"{len(theirs)} snapshot{'s' if len(theirs) > 1 else ''}"
            raise SnapshotError(
                f"{self.snapshot_dir} holds {files} of {whose} (e.g. {theirs[0].path.name}): "
                "to resume that run, call load_state_dict() with its state before "
                "the first snapshot; otherwise choose another snapshot_dir, or pass existing='overwrite' to delete them"
            )
        for info in theirs:
            info.path.unlink(missing_ok=True)
        log.warning("%s: deleted %d snapshots of another run (existing='overwrite')", self.snapshot_dir, len(theirs))

    def _stop_writing(self) -> list[tuple[Path, BaseException]]:
        """Wait for the pending writes, stop the writer, release the lock; return the failures not raised yet."""
        writer, lock, finalizer = self._writer, self._lock, self._finalizer
        self._writer = self._lock = self._finalizer = None
        self._buffers = []
        if finalizer is not None:
            finalizer.detach()
        try:
            return [] if writer is None else writer.wait()
        finally:
            if writer is not None:
                writer.stop()
            if lock is not None:
                lock.release()

    def flush(self) -> None:
        """Wait until every snapshot written so far is complete and on disk.

        Raises:
            SnapshotWriteError: naming the files and the cause, if writes failed.
        """
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """End the writing: snapshot the current step if it has none, flush, stop the writer and release the folder.

        The final snapshot makes the end of training synthesizable; it is taken
        when ``final_snapshot`` is true (the default), the tracker has a
        ``snapshot_dir`` and an update, and the current step has no snapshot yet.
        Calling it again does nothing more; a later update or snapshot starts
        writing again.

        Raises:
            SnapshotWriteError: naming every file whose write failed and was not
                reported yet; the writer is stopped and the folder released anyway.

        Example:
            >>> with PostHocEMA(torch.nn.Linear(2, 1), snapshot_dir=folder) as emas:  # doctest: +SKIP
            ...     for batch in loader:
            ...         train_step(batch)
            ...         emas.update()
            >>> # here the last step is snapshotted, on disk, and the writer thread gone
        """
        self._close(final=self.final_snapshot)

    def _close(self, *, final: bool) -> None:
        failed = [] if self._writer is None else self._writer.wait()
        try:
            if final and self.snapshot_dir is not None and self.step > 0 and self._snapshot_step < self.step:
                self.snapshot()
        finally:
            failed += self._stop_writing()
            if failed:
                raise write_error(failed)

    def __enter__(self) -> PostHocEMA:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """:meth:`close`; when the block raised, without the final snapshot (the EMAs may be mid-update)."""
        if exc is None:
            self.close()
            return
        try:
            self._close(final=False)
        except SnapshotWriteError as err:  # the block's own exception is the one to see
            log.error("%s", err)

    def __getstate__(self) -> dict[str, Any]:
        """The tracker without its writer thread, lock or staging buffers (a copy starts its own when it snapshots)."""
        state = self.__dict__.copy()
        for key in ("_writer", "_lock", "_finalizer", "_buffers", "_folder_checked", "_fused_plans"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy (copy.deepcopy, pickle) holds copies of the modules and tensors: map
        # their new identities (the slots are keyed by id()) and watch them, so the
        # copy follows assignments too; it starts a writer of its own when it snapshots.
        legacy, warned = state.pop("_legacy_resume", False), state.pop("_warned_wide", set())
        self.__dict__.update(state)
        self._fused_plans = {}
        self._slot = {id(r.model_tensor): (r.holder, r.index) for r in self._tracked}
        self._index_homes()
        self._init_writing()
        self._legacy_resume, self._warned_wide = legacy, warned

    def synthesize(
        self,
        sigma_rel: float,
        *,
        step: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
    ) -> StateDict:
        """Flush, then synthesize the EMA of ``sigma_rel`` from this tracker's snapshots.

        See :func:`posthoc_ema.synthesize`.
        """
        from posthoc_ema.synthesis import synthesize

        if self.snapshot_dir is None:
            raise ValueError("this PostHocEMA has no snapshot_dir to synthesize from")
        self.flush()
        return synthesize(self.snapshot_dir, sigma_rel, step=step, device=device, dtype=dtype, prefix=self.prefix)

    # -- resume ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: counters and every EMA tensor, the schedules' included.

        The schedules are recorded by name and metadata spec
        (:func:`posthoc_ema.schedules.to_metadata`). Loads back with
        ``torch.load(..., weights_only=True)``. On a rank that keeps no EMAs
        (``rank0_only=True``, see :attr:`holds_emas`) it holds the counters only,
        marked ``"counters_only": True``; save rank 0's state to resume.
        """
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "sigma_rels": list(self.sigma_rels),
            "step": self.step,
            "ema_step": self._ema_step,
            "calls": self._calls,
            "snapshot_step": self._snapshot_step,
            "run_id": self.run_id,
            "start_steps": list(self._start_steps),
            "schedules": {name: spec for name, _, spec in self._named},
        }
        if not self._holds_emas:
            return state | {"emas": [], "schedule_emas": {}, "counters_only": True}
        return state | {
            "emas": [dict(self._ema_items(i)) for i in range(len(self.sigma_rels))],
            "schedule_emas": {
                name: dict(self._ema_items(len(self.sigma_rels) + i)) for i, name in enumerate(self.names)
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`, bit for bit.

        The saved sigma_rels are matched to this tracker's by value (to 6
        significant digits), in any order. This tracker may track sigma_rels the
        state does not hold: each such EMA starts from the model's current
        weights at the restored step, and its snapshots record that step as
        ``start_step``. Synthesis leaves such snapshots out, as their profile is
        not a power function from step 0 (see :func:`posthoc_ema.plan`).

        The classic schedules must be the same, by name and spec, as the state's:
        their EMAs are restored bit for bit too.

        Snapshots already in ``snapshot_dir`` are kept; the ones after the
        restored step come from the interrupted run and are replaced as training
        reaches their step again.

        On a rank that keeps no EMAs (``rank0_only=True``) only the counters are
        restored, from any state (rank 0's included: load the same checkpoint on
        every rank).

        Raises:
            ValueError: if the state is not a tracker state, holds a sigma_rel this
                tracker does not track, has other schedules (names or specs), or
                its tensor names or shapes differ from this tracker's, or if it
                holds the counters only and this tracker keeps the EMAs.

        Example:
            >>> model = torch.nn.Linear(2, 1)
            >>> old = PostHocEMA(model, sigma_rels=(0.05, 0.10))
            >>> old.update()
            >>> new = PostHocEMA(model, sigma_rels=(0.10, 0.05, 0.15))  # 0.15 starts now
            >>> new.load_state_dict(old.state_dict())
            >>> new.step
            1
        """
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError("not a PostHocEMA state_dict (its 'format' entry is missing or different)")
        if state_dict["version"] > STATE_VERSION:
            raise ValueError(f"state_dict version {state_dict['version']} is newer than this posthoc-ema reads")
        theirs = [float(s) for s in state_dict["sigma_rels"]]
        unknown = [s for s in theirs if not any(profiles.same_sigma_rel(s, m) for m in self.sigma_rels)]
        if unknown:
            raise ValueError(
                f"the state_dict tracks sigma_rel={unknown[0]!r}, which this PostHocEMA does not "
                f"(it tracks {', '.join(map(repr, self.sigma_rels))}); create it with every saved sigma_rel"
            )
        saved_schedules = dict(state_dict.get("schedules", {}))
        ours = {name: spec for name, _, spec in self._named}
        if saved_schedules != ours:
            differ = sorted(n for n in set(saved_schedules) | set(ours) if saved_schedules.get(n) != ours.get(n))
            name = differ[0]
            raise ValueError(
                f"the state_dict's schedules differ from this PostHocEMA's at {name!r}: saved "
                f"{saved_schedules.get(name, 'nothing')}, here {ours.get(name, 'nothing')}; create the tracker "
                "with the schedules of the run it resumes"
            )
        saved_of: dict[int, int] = {}  # this tracker's index -> the state's index
        for j, s in enumerate(theirs):
            saved_of[next(i for i, m in enumerate(self.sigma_rels) if profiles.same_sigma_rel(s, m))] = j
        if not self._holds_emas:  # rank0_only on another rank: the counters only
            starts = state_dict.get("start_steps", [0] * len(theirs))
            self._start_steps = [
                int(starts[saved_of[i]]) if i in saved_of else int(state_dict["ema_step"])
                for i in range(len(self.sigma_rels))
            ]
            self._restore_counters(state_dict)
            return
        if state_dict.get("counters_only"):
            raise ValueError(
                "the state_dict holds the counters only (saved on a rank other than 0 of a rank0_only=True run) "
                "and no EMA tensor; load the state saved on rank 0"
            )
        for saved in [*state_dict["emas"], *state_dict.get("schedule_emas", {}).values()]:
            missing = [k for k in self._keys if k not in saved]
            unexpected = [k for k in saved if k not in self._sources]
            if missing or unexpected:
                raise ValueError(
                    f"the state_dict's tensor names differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                    f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
                )
            for key, value in self._ema_items(0):
                if saved[key].shape != value.shape:
                    raise ValueError(
                        f"the state_dict's {key!r} has shape {tuple(saved[key].shape)}, expected {tuple(value.shape)}"
                    )
        self._check_sources()  # the added EMAs copy the model's tensors as they are now
        saved_starts = state_dict.get("start_steps", [0] * len(theirs))
        ema_step = int(state_dict["ema_step"])
        for index in range(len(self.sigma_rels)):
            if index in saved_of:
                saved = state_dict["emas"][saved_of[index]]
                for key, value in self._ema_items(index):
                    value.copy_(saved[key])
                self._start_steps[index] = int(saved_starts[saved_of[index]])
            else:  # a copy of the floating tensors; the copied integer buffers are shared by all EMAs
                for group in self._groups:
                    torch._foreach_copy_(group.emas[index], group.sources)
                self._start_steps[index] = ema_step
                log.info("sigma_rel=%r is new in this run: its EMA starts at step %d", self.sigma_rels[index], ema_step)
        for i, name in enumerate(self.names):
            saved = state_dict["schedule_emas"][name]
            for key, value in self._ema_items(len(self.sigma_rels) + i):
                value.copy_(saved[key])
        self._restore_counters(state_dict)
        if self.snapshot_dir is not None:
            later = [
                i
                for i in list_snapshots(
                    self.snapshot_dir, prefix=self.prefix, include_classic=True, skip_unreadable=True
                )
                if i.step > self.step and i.run_id in (self.run_id, None)
            ]
            if later:
                log.warning(
                    "%s holds %d snapshots after the resumed step %d, from the interrupted run; each is "
                    "replaced when this run snapshots the same step, and any left over is used by synthesis: "
                    "delete them if the snapshot steps changed",
                    self.snapshot_dir,
                    len(later),
                    self.step,
                )

    def _restore_counters(self, state_dict: Mapping[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self._ema_step = int(state_dict["ema_step"])
        self._calls = int(state_dict["calls"])
        self._snapshot_step = int(state_dict["snapshot_step"])
        # The resumed run keeps its id, so its snapshots already in the folder are its own.
        self.run_id, self._legacy_resume = state_dict.get("run_id") or self.run_id, "run_id" not in state_dict
        self._folder_checked = False


def _is_dtensor(t: torch.Tensor) -> bool:
    dtensor = distributed.dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _sharding_difference(old: torch.Tensor, new: torch.Tensor) -> str | None:
    """How DTensor ``new`` is placed otherwise than ``old`` (placements, mesh, local shape), or None."""
    old_d, new_d = old, new
    if not _is_dtensor(new_d):
        return "no DTensor placement (a plain tensor)"
    if new_d.placements != old_d.placements:  # type: ignore[attr-defined]
        return f"placements {new_d.placements} instead of {old_d.placements}"  # type: ignore[attr-defined]
    if new_d.device_mesh != old_d.device_mesh:  # type: ignore[attr-defined]
        return "another device mesh"
    new_local, old_local = distributed.local_tensor(new_d), distributed.local_tensor(old_d)
    if tuple(new_local.shape) != tuple(old_local.shape):
        return f"a local shard of shape {tuple(new_local.shape)} instead of {tuple(old_local.shape)}"
    return None


def _is_writer_rank() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
