"""Training (``dota train``): the paper's recipe by default, resumable, seeded, DDP-ready.

Recipe (paper): MSE on min-max scaled dose, LAMB (lr 1e-3, weight decay 1e-4), lr halved every 4
epochs, batch 8, 90/10 split, random 90-degree lateral rotations, best-validation checkpoint.

Determinism: the batch order of epoch e comes from a generator seeded by (seed, e), augmentation of
item i from (seed, e, i), and dropout from torch's generator re-seeded by (seed, e, step, rank)
before every step. A run interrupted at any point and resumed from its last saved state therefore
gives bit-identical weights to an uninterrupted run on the same machine.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on CUDA); each rank takes every world_size-th batch of the shared order, rank 0 writes files.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dota.checkpoint import (
    atomic_write,
    check_config_dict,
    check_normalization_dict,
    load_model,
    load_state_checked,
    load_training_state,
    save_model,
    save_training_state,
)
from dota.data.dataset import BeamletDataset, compute_normalization, split_indices
from dota.data.hdf5 import BeamletFile
from dota.errors import DataFileError, InputError, TrainingError
from dota.fileio import check_output
from dota.inference import InferenceEngine
from dota.model import DoTA, DoTAConfig, init_weights
from dota.optim import Lamb
from dota.report.schema import read_json
from dota.runtime import resolve_device

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
#: Every file a run writes into its folder (what ``overwrite`` replaces).
RUN_FILES: tuple[str, ...] = (STATE_FILE, BEST_FILE, LAST_FILE, "train_config.json", "history.json",
                              "history.csv", "history.png", "summary.json")
#: TrainConfig fields a resumed run may change: they do not change what is trained.
RESUME_MAY_CHANGE: tuple[str, ...] = ("device", "checkpoint_every", "validate_cache_beamlets")
#: TrainConfig fields a resumed run may raise: more epochs extend it (the schedule depends on the epoch only,
#: so the result is that of a run started with them); fewer would leave finished epochs behind.
RESUME_MAY_GROW: tuple[str, ...] = ("epochs",)


@dataclass
class TrainConfig:
    preset: str = "paper"  # model preset (see dota.model.PRESETS)
    epochs: int = 30
    batch_size: int = 8  # per optimizer step, over all ranks
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "lamb"  # "lamb" or "adamw"
    lr_halving_epochs: int = 4  # lr is halved every this many epochs (0: constant)
    val_fraction: float = 0.1
    augment: bool = True  # random 90-degree lateral rotations
    flips: bool = False
    seed: int = 0
    checkpoint_every: int = 50  # also save the resumable state every this many steps (0: epoch ends only)
    validate_cache_beamlets: int = 4  # validation beamlets used to check the cached inference path each epoch
    device: str = "auto"
    # fine-tuning: a checkpoint whose weights, model config and normalisation start the run (preset unused)
    init: str | None = None
    # weight of the lateral-integral term of the loss (:func:`training_loss`; 0: plain voxel MSE)
    integral_weight: float = 0.0
    # weight of the radial-ring term of the loss (:func:`training_loss`; 0: none)
    ring_weight: float = 0.0
    # decay of the exponential moving average of the weights that is validated and saved (0: none)
    ema: float = 0.0

    def lr_at(self, epoch: int) -> float:
        return self.lr * (0.5 ** (epoch // self.lr_halving_epochs) if self.lr_halving_epochs else 1.0)

    def check(self) -> None:
        """Refuse values that cannot train (one :class:`InputError` line naming the option)."""

        def number(name: str, ok: Callable[[float], bool], what: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise InputError(f"--{name.replace('_', '-')} must be {what}, got {v!r}")

        for name in ("epochs", "batch_size"):
            number(name, lambda v: v >= 1 and float(v).is_integer(), "a positive integer")
        for name in ("lr_halving_epochs", "checkpoint_every", "validate_cache_beamlets"):
            number(name, lambda v: v >= 0 and float(v).is_integer(), "a non-negative integer")
        number("lr", lambda v: v > 0, "positive")
        number("weight_decay", lambda v: v >= 0, "non-negative")
        number("val_fraction", lambda v: 0 < v < 1, "between 0 and 1")
        number("integral_weight", lambda v: v >= 0, "non-negative")
        number("ring_weight", lambda v: v >= 0, "non-negative")
        number("ema", lambda v: 0 <= v < 1, "at least 0 and below 1")
        if self.init is not None:
            from dota.model import PRESETS

            if str(self.init) in PRESETS:
                raise InputError(f"--init takes a checkpoint file (or 'default', the shipped model), not the preset "
                                 f"{self.init!r}: fresh weights are --preset {self.init}")
            if self.preset != TrainConfig.preset:
                raise InputError("--init takes the model (preset, normalisation) from its checkpoint: "
                                 "give --init or --preset, not both")
        else:
            DoTAConfig.from_name(self.preset)


def _config_for(config: TrainConfig | dict[str, Any] | None, saved: dict[str, Any] | None,
                out_dir: Path) -> TrainConfig:
    """The run's TrainConfig: ``config`` (a TrainConfig, or the fields given) for a new run; for a resumed
    one the ``saved`` config, refusing any field that ``config`` changes (except :data:`RESUME_MAY_CHANGE`, and
    :data:`RESUME_MAY_GROW` raised)."""
    given = asdict(config) if isinstance(config, TrainConfig) else dict(config or {})
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(given) - known)
    if unknown:
        raise InputError(f"unknown training settings {unknown}")
    if saved is None:
        cfg = config if isinstance(config, TrainConfig) else TrainConfig(**given)
        cfg.check()
        return cfg
    saved = {k: v for k, v in saved.items() if k in known}
    may = set(RESUME_MAY_CHANGE) | {k for k in RESUME_MAY_GROW if k in given and k in saved and given[k] > saved[k]}
    changed = [k for k, v in given.items() if k not in may and k in saved and saved[k] != v]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in changed)
        now = ", ".join(f"{given[k]}" for k in changed)
        raise InputError(f"--resume: the run in {out_dir} was started with {was}, not {now}; resume with its "
                         "settings, or start a new run (another --out, or --overwrite)")
    cfg = TrainConfig(**{**saved, **{k: v for k, v in given.items() if k in may}})
    cfg.check()
    return cfg


class _Dist:
    """Rank/world bookkeeping; a no-op outside torchrun."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.active:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _seed_for_step(seed: int, epoch: int, step: int, rank: int) -> int:
    return int(np.random.default_rng([seed, epoch, step, rank]).integers(2**62))


def train(
    data: str | Path | list[str | Path],
    out_dir: str | Path,
    config: TrainConfig | dict[str, Any] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    val_data: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    time_budget_s: float | None = None,
    command: str | None = None,
) -> TrainSummary:
    """Train a DoTA model on dataset file(s) ``data``; write checkpoints, history and plot to ``out_dir``.

    ``val_data`` gives a separate validation file; otherwise ``val_fraction`` of ``data`` is held out.
    ``config`` is a :class:`TrainConfig` or a dict of the settings given (the others keep their defaults).
    ``resume`` continues from ``out_dir/state.pt`` with the settings saved there: a ``config`` that changes
    any of them (other than :data:`RESUME_MAY_CHANGE`) is refused. ``overwrite`` starts a new run in a
    folder holding one (its files are removed first). A loss that becomes NaN or inf stops training with
    a :class:`~dota.errors.TrainingError`; the state saved before it is kept. ``on_step(epoch, step)``
    is called after every optimizer step (tests use it to simulate an interruption).
    ``time_budget_s`` stops after the last epoch that is expected to finish within the budget (the
    run can be continued later with ``resume``; the stopping point then depends on timing).
    ``command`` is recorded in ``summary.json`` (the CLI passes its command line) for the report.
    Returns the summary (:class:`TrainSummary`, also written to ``out_dir/summary.json``).
    """
    out_dir = Path(out_dir)
    paths = [Path(p) for p in (data if isinstance(data, list) else [data])]
    if resume and overwrite:
        raise InputError("--resume continues a run and --overwrite replaces it: give one of them")
    state = None
    if resume:
        if not (out_dir / STATE_FILE).is_file():
            raise DataFileError(f"--resume: no training state in {out_dir} (expected {out_dir / STATE_FILE})")
        state = load_training_state(out_dir / STATE_FILE)
        if not isinstance(state, dict) or not isinstance(state.get("train_config"), dict):
            raise DataFileError(f"training state {out_dir / STATE_FILE} has no training settings")
    elif (out_dir / STATE_FILE).exists() and not overwrite:
        raise InputError(f"{out_dir} already holds a training run: pass --resume to continue it, --overwrite "
                         "to start over, or choose another --out")
    cfg = _config_for(config, None if state is None else state["train_config"], out_dir)
    if state is not None and "data" in state:
        # a resumed run needs the data it started with: without the same --val-data it would split the
        # training files 90/10 and train on other beamlets (seen once: 3,600 instead of 4,000)
        started = {"data": state["data"], "val_data": state.get("val_data")}
        now = {"data": [str(Path(p)) for p in (data if isinstance(data, list) else [data])],
               "val_data": None if val_data is None else str(val_data)}
        for key in ("data", "val_data"):
            if started[key] != now[key]:
                flag = "the data files" if key == "data" else "--val-data"
                raise InputError(f"{out_dir} was started with {flag} {started[key]}, not {now[key]}: "
                                 "resume with the same data")
    check_output(out_dir, inputs=[*paths, val_data], folder=True, writes=RUN_FILES, overwrite=overwrite,
                 resumable=resume)

    device = resolve_device(cfg.device)
    ddp = _Dist(device)
    if device.type == "cpu":
        # OMP_NUM_THREADS, when set, wins (e.g. 1 for a run in the background beside other work)
        env_threads = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(env_threads) if env_threads.isdigit() and int(env_threads) > 0
                              else max(1, (os.cpu_count() or 1) // ddp.world))
    if cfg.batch_size % ddp.world:
        raise InputError(f"batch size {cfg.batch_size} is not divisible by the {ddp.world} DDP processes")

    # -- data and normalisation ------------------------------------------------------------------
    n_total = sum(_count(p) for p in paths)
    if val_data is None:
        train_idx, val_idx = split_indices(n_total, cfg.val_fraction, cfg.seed)
        val_paths = paths
    else:
        train_idx, val_idx = np.arange(n_total), None
        val_paths = [Path(val_data)]
    # fine-tuning: the --init checkpoint's weights and model; a resumed run has both in its state instead
    init_model = load_model(cfg.init) if cfg.init is not None and state is None else None
    model_cfg = None
    if init_model is not None:
        model_cfg = init_model.config
    elif state is not None and state.get("model_config") is not None:
        model_cfg = check_config_dict(state["model_config"], str(out_dir / STATE_FILE))
    if state is not None:
        norm = check_normalization_dict(state["normalization"], str(out_dir / STATE_FILE))
    elif init_model is not None:  # fine-tuning: the weights only mean something on their own scales
        norm = init_model.normalization
    else:
        norm = compute_normalization(paths, train_idx)
    preset_cfg = DoTAConfig.from_name(cfg.preset) if model_cfg is None else model_cfg
    base = {"base_engine": preset_cfg.base_engine, "base_input": preset_cfg.base_input}
    train_ds = BeamletDataset(paths, norm, train_idx, augment=cfg.augment, flips=cfg.flips, seed=cfg.seed,
                              progress=progress and ddp.main, **base)
    val_ds = BeamletDataset(val_paths, norm, val_idx, progress=progress and ddp.main, **base)
    if state is None and model_cfg is None and preset_cfg.base_engine and train_ds.base_max > 0:
        # A model on a base engine takes its dose scale from the base (deterministic) instead of the largest
        # Monte Carlo voxel, which at few primaries is a noise spike (seen: 31.5 against typical maxima of
        # 2-3 Gy per 1e9): that squeezed the base-dose input channel to a few per cent of its range.
        norm.dose_max = train_ds.base_max
    if train_ds.block_shape != preset_cfg.block_shape:
        what = f"preset {cfg.preset!r}" if cfg.init is None else f"the --init model {cfg.init}"
        raise InputError(f"data blocks {train_ds.block_shape} do not match {what} ({preset_cfg.block_shape})")

    # -- model and optimizer ---------------------------------------------------------------------
    if init_model is not None:
        model = init_model.to(device).train()
    else:
        model = init_weights(DoTA(preset_cfg, norm), cfg.seed).to(device)
    params = list(model.parameters())
    if cfg.optimizer == "lamb":
        opt: torch.optim.Optimizer = Lamb(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise InputError(f"unknown optimizer {cfg.optimizer!r}: use lamb or adamw")
    history: list[EpochRecord] = []
    start_epoch, start_step, best_val = 0, 0, math.inf
    run_sums = [0.0, 0.0]
    if state is not None:
        load_state_checked(model, state["model"], str(out_dir / STATE_FILE))
        opt.load_state_dict(state["optimizer"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        best_val, history, run_sums = float(state["best_val"]), list(state["history"]), list(state["run_sums"])
    net = DistributedDataParallel(model) if ddp.active else model
    # the weights validated and saved: the model's own, or their moving average (every rank keeps the same)
    ema = _WeightAverage(model, cfg.ema) if cfg.ema else None
    if ema is not None and state is not None:
        if "ema" not in state:
            raise DataFileError(f"training state {out_dir / STATE_FILE} has no weight average for --ema")
        ema.load_state_dict(state["ema"], str(out_dir / STATE_FILE))
    kept = model if ema is None else ema.model

    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch == 0:
        raise InputError(f"{len(train_ds)} training beamlets are fewer than one batch of {cfg.batch_size}")
    local_batch = cfg.batch_size // ddp.world
    data_engines = _data_engines(paths)
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:  # a new run: nothing of the old one may be resumed or reported as this one's
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
        atomic_write(out_dir / "train_config.json", lambda t: Path(t).write_text(json.dumps(asdict(cfg), indent=2)))
    ddp.barrier()
    saved_at: list[tuple[int, int]] = [(start_epoch, start_step)] if state is not None else []

    def save_state(epoch: int, step: int) -> None:
        if ddp.main:
            save_training_state(out_dir / STATE_FILE, {
                "train_config": asdict(cfg),
                "normalization": norm.to_dict(),
                "model_config": json.loads(json.dumps(model.config.to_dict())),  # as a checkpoint holds it
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(),
                "epoch": epoch, "step": step, "best_val": best_val,
                "history": history, "run_sums": run_sums,
                "data": [str(p) for p in paths], "val_data": None if val_data is None else str(val_data),
                **({} if ema is None else {"ema": ema.state_dict()}),
            })
        saved_at.append((epoch, step))
        ddp.barrier()

    def diverged(what: str, value: float, epoch: int, step: int | None) -> TrainingError:
        where = f"epoch {epoch + 1}" + ("" if step is None else f", step {step + 1}")
        if saved_at:
            e, st = saved_at[-1]
            kept = f"the last good state ({out_dir / STATE_FILE}, after {e} epoch(s)" + (
                f" and {st} step(s)" if st else "") + ") is kept"
        else:
            kept = "no state had been saved yet"
        return TrainingError(f"training stopped: the {what} became {value} at {where}; {kept}; "
                             "start a new run with a lower --lr")

    pbar = None
    if progress and ddp.main:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch + start_step,
                    unit="step", dynamic_ncols=True)
    t_start = t_epoch = time.perf_counter()
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(epoch)
        train_ds.set_epoch(epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_ds))
        net.train()
        first = start_step if epoch == start_epoch else 0
        if first == 0:
            run_sums = [0.0, 0.0]
        for step in range(first, steps_per_epoch):
            batch_idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            mine = batch_idx[ddp.rank * local_batch : (ddp.rank + 1) * local_batch]
            g, e, d = _collate([train_ds[int(i)] for i in mine], device)
            torch.manual_seed(_seed_for_step(cfg.seed, epoch, step, ddp.rank))
            loss = training_loss(net(g, e), d, cfg.integral_weight, cfg.ring_weight)
            s, n = ddp.sum([float(loss.detach()) * len(mine), float(len(mine))], device)
            if not math.isfinite(s):  # every rank sees the same sum: all stop here, before the step
                if pbar is not None:
                    pbar.close()
                raise diverged("training loss", float(loss.detach()), epoch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update()
            run_sums = [run_sums[0] + s, run_sums[1] + n]
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(epoch=epoch + 1, loss=f"{run_sums[0] / run_sums[1]:.3e}", lr=f"{cfg.lr_at(epoch):.1e}")
            if on_step is not None:
                on_step(epoch, step + 1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                save_state(epoch, step + 1)

        val_loss, val_mse = _validate(kept, val_ds, local_batch, device, ddp, cfg.integral_weight, cfg.ring_weight)
        if not math.isfinite(val_loss):
            if pbar is not None:
                pbar.close()
            raise diverged("validation loss", val_loss, epoch, None)
        record: EpochRecord = {
            "epoch": epoch + 1,
            "train_loss": run_sums[0] / max(run_sums[1], 1),
            "val_loss": val_loss,
            "lr": cfg.lr_at(epoch),
            "seconds": time.perf_counter() - t_epoch,
        }
        if cfg.integral_weight or cfg.ring_weight:
            record["val_mse"] = val_mse
        if ddp.main and cfg.validate_cache_beamlets:
            record.update(validate_cached_path(kept, val_ds, cfg.validate_cache_beamlets))
            model.train()
        history.append(record)
        improved = val_loss < best_val
        best_val = min(best_val, val_loss)
        if ddp.main:
            extra = {"epoch": epoch + 1, "val_loss": val_loss, "data_engines": data_engines}
            if improved:
                save_model(kept, out_dir / BEST_FILE, extra=extra)
            save_model(kept, out_dir / LAST_FILE, extra=extra)
            write_history(history, out_dir)
            msg = (f"epoch {epoch + 1}/{cfg.epochs}: train {record['train_loss']:.3e} "
                   f"val {val_loss:.3e} lr {record['lr']:.1e}")
            if "cache_max_abs_diff_rel" in record:
                msg += f" cached-path diff {record['cache_max_abs_diff_rel']:.1e} speedup {record['cache_speedup']:.2f}x"
            (pbar.write if pbar is not None else log.info)(msg)
        save_state(epoch + 1, 0)
        now = time.perf_counter()
        if time_budget_s is not None and epoch + 1 < cfg.epochs:
            over = (now - t_start) + (now - t_epoch) > time_budget_s
            if ddp.sum([float(over)], device)[0] > 0:  # every rank stops at the same epoch
                stopped_early = True
                if ddp.main:
                    msg = f"time budget of {time_budget_s:.0f} s reached after epoch {epoch + 1}; --resume continues"
                    (pbar.write if pbar is not None else log.info)(msg)
                break
        t_epoch = now
    if pbar is not None:
        pbar.close()
    train_ds.close()
    val_ds.close()
    summary: TrainSummary = {
        "version": SUMMARY_VERSION,
        "out_dir": str(out_dir),
        "data": [str(p) for p in paths],
        "val_data": None if val_data is None else str(val_data),
        "command": command,
        "config": asdict(cfg),
        "best_checkpoint": str(out_dir / BEST_FILE) if (out_dir / BEST_FILE).is_file() else None,
        "best_val_loss": best_val,
        "epochs": cfg.epochs,
        "epochs_done": len(history),
        "stopped_early": stopped_early,
        "train_beamlets": len(train_ds),
        "val_beamlets": len(val_ds),
        "parameters": model.num_parameters(),
        "world_size": ddp.world,
        "history": history,
    }
    if ddp.main:
        atomic_write(out_dir / "summary.json", lambda t: Path(t).write_text(json.dumps(summary, indent=2)))
    return summary


class _WeightAverage:
    """Exponential moving average of a model's weights (Polyak averaging): after every optimizer step
    ``avg = d * avg + (1 - d) * w``, with the decay ``d`` ramped up as ``min(decay, (1 + t) / (10 + t))``
    over the first steps ``t`` so that a fresh model's random weights are soon forgotten. Buffers are
    copied. It smooths the step-to-step noise of the weights that the loss's Monte Carlo noise causes (seen
    in fine-tuning: the plan's target dose moving by +-1 % from one epoch to the next)."""

    def __init__(self, model: DoTA, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        for q in self.model.parameters():
            q.requires_grad_(False)
        self.source, self.decay, self.steps = model, decay, 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for avg, w in zip(self.model.parameters(), self.source.parameters()):
            avg.lerp_(w.detach(), 1.0 - d)
        for avg, w in zip(self.model.buffers(), self.source.buffers()):
            avg.copy_(w)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        load_state_checked(self.model, state["model"], where)
        self.steps = int(state["steps"])


def _count(path: Path) -> int:
    with BeamletFile(path) as f:
        return len(f)


def _data_engines(paths: list[Path]) -> list[str]:
    """The engines that made the training files (their ``engine`` attribute), for the checkpoint's record:
    plans give a model trained on MCsquare blocks MCsquare's block corrections (:class:`~dota.engines.learned.LearnedEngine`)."""
    engines = set()
    for path in paths:
        with BeamletFile(path) as f:
            engines.add(str(f.attrs.get("engine", "unknown")))
    return sorted(engines)


def _collate(items: list[tuple[torch.Tensor, ...]], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(x).to(device, non_blocking=True) for x in zip(*items))


#: Lateral grids of :func:`training_loss`'s integral term: 3 x 3 cells (core and the eight cells around it)
#: and the whole slice.
INTEGRAL_GRIDS: tuple[tuple[int, int], ...] = ((3, 3), (1, 1))

#: Edges (in voxels from the block's lateral centre, where the beam axis lies) of the rings of
#: :func:`training_loss`'s ring term: 4, 8, 20, 20, 28, 32, 96, 108, 192 and 68 voxels of a 24 x 24 slice.
RING_EDGES_VOXELS: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 13.0, math.inf)


@functools.lru_cache(maxsize=8)
def _ring_means(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, h * w) matrix taking the mean of a slice over each non-empty ring of :data:`RING_EDGES_VOXELS`,
    and the rings' voxel counts (K,)."""
    y, x = np.mgrid[0:h, 0:w]
    ring = np.digitize(np.hypot(y - (h - 1) / 2, x - (w - 1) / 2).ravel(), RING_EDGES_VOXELS[1:-1])
    members = np.stack([ring == k for k in np.unique(ring)]).astype(np.float32)
    counts = members.sum(axis=1)
    return torch.from_numpy(members / counts[:, None]), torch.from_numpy(counts)


def _shared_error(means: torch.Tensor, counts: torch.Tensor | float) -> torch.Tensor:
    """Mean over cells (and slices) of ``n * mean**2``, the score of :func:`training_loss`'s lateral terms."""
    return (means.pow(2) * counts).mean()


def training_loss(pred: torch.Tensor, target: torch.Tensor, integral_weight: float = 0.0,
                  ring_weight: float = 0.0) -> torch.Tensor:
    """The training objective on (B, L, H, W) scaled dose: voxel MSE, plus ``integral_weight`` times the
    lateral-integral term and ``ring_weight`` times the radial-ring term.

    Both terms average the error over each cell of a partition of every slice and score ``n * mean**2``
    (``n`` voxels per cell), averaged over the cells: for independent noise of variance s**2 each
    partition expects s**2, like the voxel MSE, but an error shared by a cell's ``n`` voxels counts ``n``
    times more. The integral term's partitions are the :data:`INTEGRAL_GRIDS`: voxel MSE alone lets a small
    bias over the thousands of low-dose voxels of a beamlet's tails stand (measured on the first default
    model: tails +1.3 % of the integral dose at rel. dose < 1e-2, the core -0.5 %; +0.8 % in all on its own
    training data), and whole plans sum that bias coherently. The ring term's cells are rings around the
    beam axis (:data:`RING_EDGES_VOXELS`), so it scores the radial profile of each slice: a lateral
    width that is off by a fraction of a millimetre is an error of one sign all round a ring (measured: the
    first default model's slices 0.15 mm wider than MCsquare's, dose-weighted, on a head-and-neck plan's
    blocks and on the validation beamlets; fine-tuning that removed the width bias on the validation
    beamlets, with or without this term, left that plan's gamma pass rate where it was)."""
    loss = F.mse_loss(pred, target)
    if integral_weight or ring_weight:
        err = (pred - target).flatten(0, 1)  # (B * L, H, W)
        h, w = err.shape[-2:]
    if integral_weight:
        for cells in INTEGRAL_GRIDS:
            pooled = F.adaptive_avg_pool2d(err.unsqueeze(1), cells)
            loss = loss + integral_weight * _shared_error(pooled, h * w / (cells[0] * cells[1]))
    if ring_weight:
        means, counts = _ring_means(h, w)
        rings = err.flatten(1) @ means.to(err).T  # (B * L, K)
        loss = loss + ring_weight * _shared_error(rings, counts.to(err))
    return loss


@torch.no_grad()
def _validate(model: DoTA, ds: BeamletDataset, batch: int, device: torch.device, ddp: _Dist,
              integral_weight: float = 0.0, ring_weight: float = 0.0) -> tuple[float, float]:
    """Mean validation objective (:func:`training_loss`) and mean voxel MSE over all ranks (each rank
    takes a strided share)."""
    model.eval()
    total, mse, count = 0.0, 0.0, 0.0
    mine = list(range(ddp.rank, len(ds), ddp.world))
    for s in range(0, len(mine), batch):
        g, e, d = _collate([ds[i] for i in mine[s : s + batch]], device)
        pred = model(g, e)
        total += float(training_loss(pred, d, integral_weight, ring_weight)) * g.shape[0]
        mse += float(F.mse_loss(pred, d, reduction="sum")) / d[0].numel()
        count += g.shape[0]
    total, mse, count = ddp.sum([total, mse, count], device)
    return total / max(count, 1.0), mse / max(count, 1.0)


def validate_cached_path(model: DoTA, ds: BeamletDataset, n: int) -> dict[str, float]:
    """Run the inference engine and the plain full pass on ``n`` validation beamlets; return the
    largest difference over the computed slices and the dose the plain pass puts beyond them (both
    relative to the beamlet's maximum), the fraction of slices computed, and the speed of each."""
    model.eval()
    items = [ds.raw(i) for i in range(min(n, len(ds)))]
    geometry = np.stack([it[0] for it in items])
    energies = np.array([it[1] for it in items], dtype=np.float32)
    check = InferenceEngine(model).compare_with_full_pass(geometry, energies)
    return {
        "cache_max_abs_diff_rel": check["max_abs_diff_rel"],
        "cache_tail_rel": check["tail_rel"],
        "cache_computed_fraction": check["computed_fraction"],
        "cache_engine_ms": check["engine_ms"],
        "cache_baseline_ms": check["baseline_ms"],
        "cache_speedup": check["baseline_ms"] / max(check["engine_ms"], 1e-9),
    }


# -- summary.json and history.json ------------------------------------------------------------------

#: Version of the layout of ``summary.json`` (:class:`TrainSummary`); raised when a key changes meaning.
SUMMARY_VERSION = 1


class EpochRecord(TypedDict):
    """One epoch of ``history.json`` (and of the summary's ``history``); the ``cache_*`` keys when the
    cached inference path was checked (:func:`validate_cached_path`)."""

    epoch: int
    train_loss: float
    val_loss: float
    lr: float
    seconds: float
    val_mse: NotRequired[float]  # voxel MSE alone, when the objective has an integral term
    cache_max_abs_diff_rel: NotRequired[float]
    cache_tail_rel: NotRequired[float]
    cache_computed_fraction: NotRequired[float]
    cache_engine_ms: NotRequired[float]
    cache_baseline_ms: NotRequired[float]
    cache_speedup: NotRequired[float]


class TrainSummary(TypedDict):
    """``summary.json``: what :func:`train` writes at the end of a run and returns."""

    version: int
    out_dir: str
    data: list[str]
    val_data: str | None
    command: str | None
    config: TrainConfig  # its fields, as asdict() gives them
    best_checkpoint: str | None
    best_val_loss: float
    epochs: int
    epochs_done: int
    stopped_early: bool
    train_beamlets: int
    val_beamlets: int
    parameters: int
    world_size: int
    history: list[EpochRecord]


def read_summary(path: str | Path) -> TrainSummary:
    """``summary.json`` read and checked; :class:`~dota.errors.DataFileError` (one line naming the file and
    the key) when a key is missing or of the wrong type."""
    return read_json(path, TrainSummary, SUMMARY_VERSION)


def read_history(path: str | Path) -> list[EpochRecord]:
    """``history.json`` (written after every epoch, so also for a run still going) read and checked."""
    return read_json(path, list[EpochRecord])


def write_history(history: list[EpochRecord], out_dir: Path) -> None:
    """history.json, history.csv and history.png (the report's training figure)."""
    from dota.report.figures import training_figure

    atomic_write(out_dir / "history.json", lambda t: Path(t).write_text(json.dumps(history, indent=2)))
    keys = list(dict.fromkeys(k for r in history for k in r))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(history)

    atomic_write(out_dir / "history.csv", write_csv)
    training_figure(history, out_dir / "history.png")
