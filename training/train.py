"""The training loop: read it top to bottom in :func:`train`.

A run folder holds ``last.pt`` and ``best.pt`` (weights, optimiser, loop state, random states and
the resolved config), ``metrics.csv``/``metrics.json``/``plot.png`` and, at the end,
``model.onnx``. With ``train.ema`` the loop also keeps an exponential moving average of the
weights; that average is what is validated, kept in ``best.pt`` and exported (``last.pt`` holds
both, under ``model`` and ``ema``). ``resume=True`` continues from ``last.pt``; because the
random states are saved at the end of every epoch, a resumed run reaches the same weights as one
that never stopped (on CPU; CUDA kernels are not bit-reproducible). Checkpoints hold tensors and
plain data only and are read without unpickling code (:mod:`.checkpoint`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .aggregates import NucleusBank
from .checkpoint import FORMAT, CheckpointError
from .checkpoint import load as load_checkpoint
from .checkpoint import save as save_checkpoint
from .config import Config, config_from_saved, to_dict
from .data import Item
from .init import freeze_norm_statistics, load_onnx_weights
from .losses import sparse_loss
from .metrics import dice_counts, dice_scores, write_log
from .model import load_weights, make_model, weights_of
from .sampling import Sampler, validation_set
from .sets import build_data, class_values
from .teacher import label_edges, teacher_loss, teacher_outputs
from .unet import count_parameters

log = logging.getLogger(__name__)
RESUMABLE_KEYS = (("train", "epochs"), ("train", "export"), ("train", "device"),
                  ("train", "threads"))


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = \"cuda\" but no CUDA GPU is visible; use \"cpu\" or "
                         "\"auto\"")
    return torch.device(name)


def _load_into(model: torch.nn.Module, cfg: Config, source: str, key: str) -> Path:
    """Weights from ``source`` (an exported ONNX model or a checkpoint) into ``model``."""
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"train.{key}: {path} not found; give an ONNX model exported by "
                              "wsiseg-train or a .pt checkpoint")
    if path.suffix == ".onnx":
        try:
            load_onnx_weights(model, path)
        except ValueError as e:
            raise CheckpointError(f"train.{key}: {e}") from None
    else:
        load_weights(model, weights_of(load_checkpoint(path)), cfg)
    return path


def start_from(model: torch.nn.Module, cfg: Config) -> None:
    """Initial weights from ``train.init`` (an exported ONNX model or a checkpoint)."""
    log.info("starting from the weights of %s", _load_into(model, cfg, cfg.train.init, "init"))


def make_teacher(cfg: Config, device: torch.device) -> torch.nn.Module | None:
    """The frozen ``train.teacher`` (the model's architecture, at ``train.teacher_width`` when
    that is set; evaluation mode), or None."""
    if not cfg.train.teacher:
        return None
    if cfg.train.teacher_width:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 width=cfg.train.teacher_width))
    teacher = make_model(cfg)
    log.info("teacher: %s", _load_into(teacher, cfg, cfg.train.teacher, "teacher"))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


def check_resumable(saved: Config, cfg: Config) -> None:
    a, b = to_dict(saved), to_dict(cfg)
    for section, key in RESUMABLE_KEYS:
        a[section].pop(key), b[section].pop(key)
    diff = [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s].get(k)]
    if diff:
        arch = [d for d in diff if d.split(".")[1] in ("width", "depth", "norm", "classes")]
        what = "a different architecture" if arch else "different settings"
        raise CheckpointError(f"cannot resume: the run was trained with {what} "
                              f"({', '.join(arch or diff)} differ); only "
                              f"{', '.join(s + '.' + k for s, k in RESUMABLE_KEYS)} may change "
                              "on --resume")


@torch.no_grad()
def validate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, cfg: Config,
             device: torch.device, batch: int) -> dict[str, Any]:
    model.eval()
    n_classes = len(cfg.model.classes)
    counts = np.zeros((n_classes, 3), dtype=np.int64)
    losses = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).to(device)
        y = torch.from_numpy(labels[i:i + batch]).to(device)
        logits = model(x).float()
        losses.append(float(sparse_loss(logits, y, cfg.train.weighting)))
        pred = (logits.argmax(dim=1) + 1).cpu().numpy()
        counts += dice_counts(pred, labels[i:i + batch], n_classes)
    per, overall = dice_scores(counts)
    return {"val_loss": float(np.mean(losses)), "val_dice": overall, "per_class": per}


def make_ema(model: torch.nn.Module, cfg: Config) -> torch.nn.Module | None:
    """A frozen copy of the model that :func:`update_ema` moves towards the trained weights."""
    if not cfg.train.ema:
        return None
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """One step of the average: floating-point weights and statistics move by ``1 - d`` towards
    the model's, where ``d`` grows from 0.1 to ``decay`` over the first steps (so that a run
    from random weights is not dominated by them); integer buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    live = model.state_dict()
    for name, e in ema.state_dict().items():
        if e.dtype.is_floating_point:
            e.mul_(d).add_(live[name].detach(), alpha=1 - d)
        else:
            e.copy_(live[name])


def _restore(run_dir: Path, cfg: Config, resume: bool, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, rng: np.random.Generator,
             ema: torch.nn.Module | None = None) -> dict[str, Any]:
    """The loop state to start from: ``last.pt`` on resume (weights, optimiser, random states),
    else a fresh state, the model starting from ``train.init`` if given."""
    state: dict[str, Any] = {"epoch": 0, "lr": cfg.train.lr, "best_dice": -math.inf,
                             "best_epoch": 0, "since_gain": 0, "history": []}
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        check_resumable(config_from_saved(ckpt["config"]), cfg)
        load_weights(model, ckpt["model"], cfg)
        if ema is not None:
            load_weights(ema, ckpt.get("ema", ckpt["model"]), cfg)
        optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        rng.bit_generator.state = ckpt["rng"]["numpy"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        log.info("resuming %s after epoch %d", run_dir, state["epoch"])
    elif (run_dir / "last.pt").exists():
        raise CheckpointError(f"{run_dir} already holds a run; use --resume to continue it or "
                              "choose another run folder")
    elif cfg.train.init:
        start_from(model, cfg)
    if ema is not None and not resume:
        ema.load_state_dict(model.state_dict())
    return state


def make_sampler(cfg: Config, items: list[Item]) -> Sampler:
    """Training batches; the sampler's class index gets its own generator so that it is
    identical on resume."""
    values = class_values(cfg)
    aggregates = None
    if cfg.data.aggregate_p:
        value = values[cfg.data.aggregate_class]
        aggregates = (NucleusBank.from_items(items, value, cfg.data.mpp), value)
        log.info("lymphoid aggregates: nuclei of %d crops", len(aggregates[0]))
    return Sampler(items, patch_px=cfg.data.patch_px,
                   jitter_px=(cfg.data.jitter_px if cfg.data.jitter_px >= 0
                              else cfg.data.patch_px // 4),
                   sparse_dense_ratio=cfg.data.sparse_dense_ratio,
                   class_weights={values[k]: w for k, w in cfg.data.class_weights.items()},
                   augment_cfg=cfg.augment, rng=np.random.default_rng(cfg.train.seed + 1),
                   mosaic_p=cfg.data.mosaic_p, island_p=cfg.data.island_p,
                   island_px=cfg.data.island_px,
                   background=values[cfg.model.background] if cfg.model.background else 0,
                   teacher_original_colour=cfg.train.teacher_colour == "original",
                   teacher_mirror_edge=cfg.train.teacher_edge == "mirror",
                   outside_background=cfg.data.outside_background,
                   aggregate_p=cfg.data.aggregate_p, aggregates=aggregates,
                   adipose_p=cfg.data.adipose_p, mpp=cfg.data.mpp,
                   class_stain_values=tuple(values[c] for c in cfg.augment.class_stain_classes)
                   if cfg.augment.class_stain_p else ())


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler: Sampler,
                rng: np.random.Generator, cfg: Config, device: torch.device,
                ema: torch.nn.Module | None = None, first_step: int = 0,
                teacher: torch.nn.Module | None = None) -> list[float]:
    """``train.iterations`` optimiser steps (each followed by the average's step when ``ema``
    is given); returns their losses. With a ``teacher``, the whole-context patches of teacher
    sets drop their labels and learn the teacher's softmax instead (``train.teacher_weight``
    times that cross-entropy is added to the labelled loss of the other patches), mixed with
    their labels by ``train.teacher_label_mix`` and replaced by them within
    ``train.teacher_label_edge_um`` of an edge between two labelled classes."""
    model.train()
    if cfg.train.freeze_norm:
        freeze_norm_statistics(model)
    amp = device.type == "cuda" and cfg.train.amp
    losses = []
    for i in range(cfg.train.iterations):
        if teacher is None:
            images, labels = sampler.batch(cfg.train.batch_size, rng)
        else:
            images, labels, teach, shown, inside = sampler.batch_with_teacher(
                cfg.train.batch_size, rng)
            taught_labels = labels[teach].copy()
            labels[teach] = 0
        x, y = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = sparse_loss(logits.float(), y, cfg.train.weighting)
        if teacher is not None and teach.any():
            idx = torch.from_numpy(np.flatnonzero(teach)).to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                target = teacher_outputs(teacher, x[idx] if shown is images
                                         else torch.from_numpy(shown[teach]).to(device),
                                         cfg.train.teacher_tta)
            edges = None
            if cfg.train.teacher_label_edge_um > 0:
                edges = torch.from_numpy(label_edges(
                    taught_labels, cfg.train.teacher_label_edge_um / cfg.data.mpp)).to(device)
            loss = loss + cfg.train.teacher_weight * teacher_loss(
                logits[idx], target, torch.from_numpy(taught_labels).to(device),
                cfg.train.teacher_label_mix, torch.from_numpy(inside[teach]).to(device), edges)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            update_ema(ema, model, cfg.train.ema, first_step + i)
        losses.append(float(loss.detach()))
    return losses


def schedule(state: dict[str, Any], val_dice: float, cfg: Config,
             optimizer: torch.optim.Optimizer) -> bool:
    """Keep the best model by validation Dice; halve the learning rate after lr_patience epochs
    without a gain (the paper's schedule). Returns whether this epoch gained."""
    gained = math.isfinite(val_dice) and val_dice > state["best_dice"]
    if gained:
        state.update(best_dice=val_dice, best_epoch=state["epoch"], since_gain=0)
    else:
        state["since_gain"] += 1
        if state["since_gain"] >= cfg.train.lr_patience:
            state["lr"] *= cfg.train.lr_factor
            state["since_gain"] = 0
            for g in optimizer.param_groups:
                g["lr"] = state["lr"]
    return gained


def epoch_record(state: dict[str, Any], cfg: Config, losses: list[float], val: dict[str, Any],
                 seconds: float) -> dict[str, Any]:
    return {"epoch": state["epoch"], "iterations": state["epoch"] * cfg.train.iterations,
            "lr": state["lr"], "train_loss": float(np.mean(losses)),
            "val_loss": val["val_loss"], "val_dice": val["val_dice"],
            **{f"dice_{n}": d for n, d in zip(cfg.model.classes, val["per_class"])},
            "seconds": seconds, "it_per_s": cfg.train.iterations / seconds}


def save_epoch(run_dir: Path, cfg: Config, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, state: dict[str, Any],
               rng: np.random.Generator, gained: bool,
               ema: torch.nn.Module | None = None) -> None:
    """``last.pt`` (and ``best.pt`` when the epoch gained) through :mod:`.checkpoint`, and the
    metrics log. With an average, ``best.pt``'s weights are the average (what was validated)."""
    payload = {"format": FORMAT, "config": to_dict(cfg), "model": model.state_dict(),
               "optimizer": optimizer.state_dict(), "state": state,
               "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()},
               "n_params": count_parameters(model)}
    if ema is not None:
        payload["ema"] = ema.state_dict()
    if gained:
        save_checkpoint(run_dir / "best.pt",
                        {**payload, "model": payload["ema"]} if ema is not None else payload)
    save_checkpoint(run_dir / "last.pt", payload)
    write_log(run_dir, state["history"])


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) a run; returns the final loop state (best Dice, epochs, history)."""
    run_dir = Path(run_dir)
    device = select_device(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = make_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    rng = np.random.default_rng(cfg.train.seed)
    ema = make_ema(model, cfg)
    state = _restore(run_dir, cfg, resume, model, optimizer, rng, ema)
    teacher = make_teacher(cfg, device)
    run_dir.mkdir(parents=True, exist_ok=True)

    with build_data(cfg) as data:
        sampler = make_sampler(cfg, data.train)
        val_x, val_y = validation_set(data.val, patch_px=cfg.data.patch_px,
                                      n_patches=cfg.data.val_patches, seed=cfg.train.seed + 2)
        log.info("%d train / %d val items, %d val patches, %s parameters, device %s",
                 len(data.train), len(data.val), len(val_x), f"{count_parameters(model):,}", device)
        while state["epoch"] < cfg.train.epochs:
            t0 = time.perf_counter()
            losses = train_epoch(model, optimizer, sampler, rng, cfg, device, ema,
                                 state["epoch"] * cfg.train.iterations, teacher)
            seconds = time.perf_counter() - t0
            val = validate(ema if ema is not None else model, val_x, val_y, cfg, device,
                           cfg.train.batch_size)
            state["epoch"] += 1
            gained = schedule(state, val["val_dice"], cfg, optimizer)
            record = epoch_record(state, cfg, losses, val, seconds)
            state["history"].append(record)
            save_epoch(run_dir, cfg, model, optimizer, state, rng, gained, ema)
            log.info("epoch %d  loss %.4f  val loss %.4f  val Dice %.3f  lr %.2g  %.2f it/s",
                     state["epoch"], record["train_loss"], record["val_loss"], record["val_dice"],
                     state["lr"], record["it_per_s"])

    if cfg.train.export and (run_dir / "best.pt").is_file():
        from .export import export_onnx
        report = export_onnx(run_dir / "best.pt", run_dir / "model.onnx")
        log.info("exported %s (ONNX Runtime vs torch max abs diff %.2g)", report["path"],
                 report["max_abs_diff"])
    return state
