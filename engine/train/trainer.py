"""DFlash draft training against a frozen target (spec §3): the step, schedule, checkpoints, curves.

Each step: the target runs once over a batch of generated sequences and its tapped hidden states
become the draft's context; the blocks and the loss are objective.py's.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from engine.decode.proposal_head import FILE as PROPOSAL_FILE
from engine.decode.proposal_head import proposal_vocab, save_proposal_vocab
from engine.model.draft import DFlashDraft, save_draft
from engine.model.target import Target
from engine.train import progress_bar
from engine.train.dataset import MODES, BlockBatch, TokenDataset
from engine.train.objective import (
    BlockTargets,
    anchor_runs,
    block_metrics,
    block_targets,
    dflash_loss,
    soft_targets,
    walk,
)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch_tokens: int = 16384  # padded target tokens per step
    max_len: int = 1024
    blocks_per_seq: int = 32
    gamma: float = 7.0  # loss decay over block positions (spec §3.3: 7 for B = 16)
    selector_loss_weight: float = 1.0  # DFlash 2: λ of the selector's CE (NeMo's default; objective.py)
    loss: str = "ce"  # "kl": KL to the target's next-token distribution (soft labels) instead of CE to the data
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup: float = 0.04  # fraction of steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto: bfloat16 compute on a GPU, float32 on the CPU
    seed: int = 0
    modes: tuple[str, ...] = MODES  # which generated sequences to train on
    val_modes: tuple[str, ...] = MODES  # which to validate on: fits on different modes compare on the same ones
    max_train_sequences: int = 0  # 0: all; else a seeded random subset, so fits on different modes see equal data
    proposal_coverage: float = 0.985  # published drafts ship the answer tokens covering this share (0: none)
    val_permille: int = 10
    val_batches: int = 8
    val_walk_sequences: int = 24  # greedy validation sequences decoded by walk(): the τ decoding gets; 0: none
    log_every: int = 10
    eval_every: int = 250
    checkpoint_every: int = 250
    time_limit: float | None = None  # seconds of training; then checkpoint and publish

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(self.modes))
        object.__setattr__(self, "val_modes", tuple(self.val_modes))
        if unknown := (set(self.modes) | set(self.val_modes)) - set(MODES):
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
        if self.max_train_sequences < 0:
            raise ValueError(f"max_train_sequences must be >= 0, got {self.max_train_sequences}")
        if not 0 <= self.proposal_coverage < 1:
            raise ValueError(f"proposal_coverage must be in [0, 1), got {self.proposal_coverage}")
        if self.loss not in ("ce", "kl"):
            raise ValueError(f"loss must be ce or kl, got {self.loss!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        if unknown := set(data) - names:
            raise ValueError(f"unknown train config keys {sorted(unknown)}")
        return cls(**data)

    def compute_dtype(self) -> mx.Dtype:
        if self.dtype == "auto":
            return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
        return getattr(mx, self.dtype)


class LrSchedule:
    """Linear warm-up over a `warmup` share of the steps, then cosine decay to `min_lr_ratio` at step `total`.

    `total` may shrink once training has timed a few steps, so a --time-limit run still ends its
    decay inside the limit instead of being cut off at a high learning rate; the warm-up shrinks with it.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.peak, self.floor = config.lr, config.lr * config.min_lr_ratio
        self.warmup_fraction = config.warmup
        self.total = config.steps

    @property
    def warmup(self) -> int:
        # a share of the schedule as it ends now: a --time-limit fit of --steps 200000 that has time for 2,000
        # steps must warm up over 80 of them, not spend all 2,000 inside a warm-up of 8,000
        return max(1, int(self.warmup_fraction * self.total))

    def __call__(self, step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        warm = self.peak * (1e-2 + (1 - 1e-2) * step / self.warmup)
        progress = mx.clip((step - self.warmup) / max(1, self.total - self.warmup), 0.0, 1.0)
        cosine = self.floor + (self.peak - self.floor) * 0.5 * (1 + mx.cos(math.pi * progress))
        return mx.where(step < self.warmup, warm, cosine)


class Trainer:
    """Owns the optimizer, the step function, checkpoints and curves for one output directory."""

    def __init__(self, target: Target, draft: DFlashDraft, data: TokenDataset, config: TrainConfig, out_dir: Path):
        self.target, self.draft, self.data, self.config = target, draft, data, config
        self.out_dir = Path(out_dir)
        self.dtype = config.compute_dtype()
        self.target.model.freeze()
        self.schedule = LrSchedule(config)
        self.optimizer = optim.AdamW(self.schedule, betas=(0.9, 0.95), weight_decay=config.weight_decay)
        self.optimizer.init(self.draft.trainable_parameters())
        self.step_count = 0
        self.best_val_tau = 0.0  # the published draft is the best one seen on validation
        self.best_val_metric = "val_tau"  # which τ best_val_tau is (a resumed run may switch to the walked one)
        self.history: list[dict[str, Any]] = []
        train_idx, val_idx = data.split(config.val_permille)
        self.train_idx = train_idx[np.isin(data.modes[train_idx], [MODES.index(m) for m in config.modes])]
        if 0 < config.max_train_sequences < len(self.train_idx):
            picked = np.random.default_rng(config.seed).choice(len(self.train_idx), config.max_train_sequences, replace=False)
            self.train_idx = self.train_idx[np.sort(picked)]
        self.val_idx = val_idx[np.isin(data.modes[val_idx], [MODES.index(m) for m in config.val_modes])]
        if len(self.train_idx) == 0:
            raise ValueError("no training sequences (all went to validation); lower --val-permille")
        # the CPU's greedy proposals read only these columns of the head (engine/decode/proposal_head.py)
        counts = data.answer_token_counts(self.train_idx, target.vocab_size)
        self.proposal_ids = proposal_vocab(counts, config.proposal_coverage)

    # ---- one step -------------------------------------------------------------------------
    def taps(self, tokens: np.ndarray) -> mx.array:
        """(b, S) tokens -> (b, S, T*H) tapped target states; logits are never evaluated, so never computed."""
        _, taps = self.target(mx.array(tokens), None, taps=True)
        return mx.stop_gradient(taps).astype(self.dtype)

    def _target_states(self, batch: BlockBatch, blocks: BlockTargets) -> tuple[mx.array, mx.array | None]:
        """The tapped states and, with --loss kl, the target's log-probs per block row: one target forward."""
        if self.config.loss == "ce":
            return self.taps(batch.tokens), None
        logits, taps = self.target(mx.array(batch.tokens), None, taps=True)
        return mx.stop_gradient(taps).astype(self.dtype), soft_targets(logits, blocks, self.draft.config.block_size)

    def _loss_and_grad(self, taps: mx.array, soft: mx.array | None, blocks: BlockTargets) -> tuple[Any, dict]:
        def loss_of(params: dict) -> tuple[mx.array, mx.array, mx.array]:
            # float32 master weights, compute in self.dtype; grads come back float32 through astype
            self.draft.update(tree_map(lambda p: p.astype(self.dtype), params))
            return dflash_loss(self.draft, self.target, taps, blocks, self.config.selector_loss_weight, soft)

        master = self.draft.trainable_parameters()
        outputs, grads = mx.value_and_grad(loss_of)(master)
        self.draft.update(master)
        return outputs, grads

    def train_step(self, batch: BlockBatch) -> dict[str, mx.array]:
        cfg = self.config
        blocks = block_targets(batch, self.draft.config.block_size, self.draft.config.mask_token_id, cfg.gamma)
        (loss, correct, weights), grads = self._loss_and_grad(*self._target_states(batch, blocks), blocks)
        grads, grad_norm = optim.clip_grad_norm(grads, cfg.grad_clip)
        self.optimizer.update(self.draft, grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, **block_metrics(correct, weights)}
        mx.eval(self.draft.parameters(), self.optimizer.state, metrics)
        self.step_count += 1
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Loss, accuracy and τ on held-back sequences, with fixed anchors so runs compare."""
        if len(self.val_idx) == 0:
            return {}
        rng = np.random.default_rng([self.config.seed, 1])
        batches = self.data.epoch_batches(self.val_idx, self.config.batch_tokens, rng)[: self.config.val_batches]
        totals = {"val_loss": 0.0, "val_acc": 0.0, "val_tau": 0.0}
        runs = np.zeros((len(MODES), 2))  # per mode: leading correct drafts, full blocks
        master = self.draft.trainable_parameters()
        self.draft.update(tree_map(lambda p: p.astype(self.dtype), master))
        try:
            for idx in batches:
                batch = self.data.block_batch(idx, self.config.blocks_per_seq, rng)
                blocks = block_targets(batch, self.draft.config.block_size, self.draft.config.mask_token_id, self.config.gamma)
                loss, correct, weights = dflash_loss(self.draft, self.target, self.taps(batch.tokens), blocks,
                                                     self.config.selector_loss_weight)
                m = block_metrics(correct, weights)
                for key, value in (("val_loss", loss), ("val_acc", m["acc"]), ("val_tau", m["tau"])):
                    totals[key] += value.item() / len(batches)
                full, leading = np.array(m["full"]), np.array(m["run"])  # (b, N)
                for mode in np.unique(self.data.modes[idx]):
                    rows = self.data.modes[idx] == mode
                    runs[mode] += ((leading[rows] * full[rows]).sum(), full[rows].sum())
            walked = self.walk_tau()
        finally:
            self.draft.update(master)
        # τ per kind of sequence: greedy decoding meets greedy-like text, sampled decoding sampled text
        totals.update({f"val_tau_{MODES[m]}": 1 + r / n for m, (r, n) in enumerate(runs) if n > 0})
        if walked is not None:
            totals["val_walk_tau"] = walked
        return totals

    def walk_tau(self) -> float | None:
        """τ of greedy decoding along the first greedy validation sequences (objective.walk), or None."""
        greedy = self.val_idx[self.data.modes[self.val_idx] == MODES.index("greedy")][: self.config.val_walk_sequences]
        cycles = accepted = 0
        for i in greedy:
            tokens, first = self.data.sequence(i), int(self.data.response_start[i])
            runs = anchor_runs(self.draft, self.target, self.taps(tokens[None]), tokens, first)
            c, a = walk(runs, first, len(tokens))
            cycles, accepted = cycles + c, accepted + a
        return (cycles + accepted) / cycles if cycles else None

    # ---- data order -----------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, indices) forever; a pure function of the seed, so resuming just skips ahead."""
        epoch = 0
        while True:
            rng = np.random.default_rng([self.config.seed, epoch, 0])
            for idx in self.data.epoch_batches(self.train_idx, self.config.batch_tokens, rng):
                yield epoch, idx
            epoch += 1

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to `config.steps` (or step `until`, for a run cut short on purpose), then publish."""
        cfg = self.config
        last = self.schedule.total if until is None else min(until, self.schedule.total)
        start = time.perf_counter()
        timed_from: tuple[int, float] | None = None
        first_timed = 0
        stream = self.batches()
        for _ in range(self.step_count):
            next(stream)
        window: list[dict[str, mx.array]] = []
        tokens, window_start = 0, time.perf_counter()
        initial: dict[str, float] = {}
        if self.step_count == 0:
            # a continued fit starts from a published draft: the fit must beat it on this data to replace it
            initial = self.validate_and_publish()
            print("fit: before the first step " + ", ".join(f"{k} {v:.3f}" for k, v in initial.items()))
        bar = progress_bar(total=cfg.steps, desc="fit", unit="step", initial=self.step_count)
        stopped = "steps"
        try:
            while self.step_count < last:
                if cfg.time_limit is not None and time.perf_counter() - start > cfg.time_limit:
                    stopped = "time_limit"
                    break
                epoch, idx = next(stream)
                rng = np.random.default_rng([cfg.seed, self.step_count, 1])
                batch = self.data.block_batch(idx, cfg.blocks_per_seq, rng)
                window.append(self.train_step(batch))
                tokens += batch.num_tokens
                bar.update(1)
                if cfg.time_limit is not None and until is None:
                    first_timed = first_timed or self.step_count  # skips the warm-up step
                    timed_from = timed_from or (self.step_count, time.perf_counter())
                    # early steps compile kernels for new shapes (MLX CUDA JITs them): estimate again, from
                    # the latest window only
                    if self.step_count - first_timed in (50, 300, 1000):
                        last = self.fit_schedule_to_time(timed_from, cfg.time_limit - (time.perf_counter() - start))
                        bar.total = last
                        timed_from = (self.step_count, time.perf_counter())
                if self.step_count % cfg.log_every == 0 or self.step_count == cfg.steps:
                    record = self._log(window, tokens, time.perf_counter() - window_start, epoch)
                    bar.set_postfix_str(
                        f"loss {record['loss']:.3f} acc {record['acc']:.3f} tau {record['tau']:.2f} "
                        f"lr {record['lr']:.1e} {record['tokens_per_second']:.0f} tok/s"
                    )
                    window, tokens, window_start = [], 0, time.perf_counter()
                if self.step_count % cfg.eval_every == 0 and self.history:
                    self.history[-1].update(self.validate_and_publish())
                if self.step_count % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        val = self.validate_and_publish()
        self.save_checkpoint()
        return {"steps": self.step_count, "stopped_by": stopped, "seconds": time.perf_counter() - start,
                "best_val_tau": self.best_val_tau, **val, **{f"initial_{k}": v for k, v in initial.items()}}

    def fit_schedule_to_time(self, timed_from: tuple[int, float], seconds_left: float) -> int:
        """End the schedule at the steps that fit in `seconds_left` (5% kept for validation), never past --steps."""
        per_step = (time.perf_counter() - timed_from[1]) / (self.step_count - timed_from[0])
        fits = min(self.config.steps, self.step_count + int(0.95 * seconds_left / per_step))
        if fits != self.schedule.total:
            print(f"fit: {per_step * 1e3:.0f} ms/step, so {fits} of {self.config.steps} steps fit the time limit; "
                  "the learning-rate schedule now ends there")
            self.schedule.total = max(fits, self.step_count + 1)
        return self.schedule.total

    def validate_and_publish(self) -> dict[str, float]:
        """Validate; publish the draft if it beats every earlier one (always, without validation data)."""
        val = self.evaluate()
        # the walked τ is what decoding gets; random anchors overstate it (5.6 vs 3.4 on held-out chat)
        metric = "val_walk_tau" if "val_walk_tau" in val else "val_tau"
        if metric != self.best_val_metric:  # a best value of the other τ is no bar for this one
            self.best_val_tau, self.best_val_metric = 0.0, metric
        tau = val.get(metric, math.inf)
        if tau > self.best_val_tau or not (self.out_dir / "draft" / "config.json").exists():
            self.best_val_tau = max(self.best_val_tau, tau) if val else 0.0
            self.publish()
            val["published"] = 1.0
        return val

    def _log(self, window: list[dict[str, mx.array]], tokens: int, seconds: float, epoch: int) -> dict[str, Any]:
        mean = {k: float(np.mean([m[k].item() for m in window])) for k in ("loss", "acc", "tau", "grad_norm")}
        by_position = np.mean([np.array(m["acc_by_position"]) for m in window], axis=0)
        record = {
            "step": self.step_count,
            "epoch": epoch,
            **mean,
            "acc_by_position": [round(float(a), 4) for a in by_position],
            "lr": float(self.optimizer.learning_rate.item()),
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "seconds_per_step": seconds / max(len(window), 1),
        }
        self.history.append(record)
        return record

    # ---- files ------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def save_checkpoint(self) -> None:
        """Draft (float32) + optimizer state + step + config, swapped in atomically."""
        tmp = self.out_dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mx.save_safetensors(str(tmp / "draft.safetensors"), dict(tree_flatten(self.draft.parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
        state = {
            "step": self.step_count,
            "schedule_total": self.schedule.total,
            "best_val_tau": self.best_val_tau,
            "best_val_metric": self.best_val_metric,
            "train_config": {**asdict(self.config), "modes": list(self.config.modes)},
            "draft_config": self.draft.config.to_dict(),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        old = self.out_dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint_dir.exists():
            self.checkpoint_dir.rename(old)
        tmp.rename(self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.write_curves()

    def load_checkpoint(self) -> bool:
        """Resume from `checkpoint/` if present; returns whether it did."""
        state_file = self.checkpoint_dir / "state.json"
        if not state_file.exists():
            return False
        state = json.loads(state_file.read_text())
        self.draft.load_weights(str(self.checkpoint_dir / "draft.safetensors"))
        opt_state = tree_unflatten(list(mx.load(str(self.checkpoint_dir / "optimizer.safetensors")).items()))
        self.optimizer.state = opt_state
        self.step_count = int(state["step"])
        self.schedule.total = int(state.get("schedule_total", self.schedule.total))
        self.best_val_tau = float(state.get("best_val_tau", 0.0))
        self.best_val_metric = str(state.get("best_val_metric", "val_tau"))
        curves = self.out_dir / "curves.json"
        if curves.exists():
            self.history = [r for r in json.loads(curves.read_text()) if r["step"] <= self.step_count]
        mx.eval(self.draft.parameters(), self.optimizer.state)
        return True

    def publish(self) -> Path:
        """The trained draft in the published layout (bf16), ready for `--draft`."""
        path = self.out_dir / "draft"
        save_draft(self.draft, path, dtype=mx.bfloat16)
        if self.proposal_ids is not None:
            save_proposal_vocab(self.proposal_ids, path)
        else:  # a vocabulary left by an earlier fit into this directory would not be this data's
            (path / PROPOSAL_FILE).unlink(missing_ok=True)
        return path

    def write_curves(self) -> None:
        (self.out_dir / "curves.json").write_text(json.dumps(self.history, indent=0))
        plot_curves(self.history, self.out_dir / "curves.png")


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, accuracy and τ against steps; skipped with a warning where matplotlib is missing."""
    if not history:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: curves.json written, curves.png skipped", stacklevel=2)
        return
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("loss", "acc", "tau")):
        ax.plot(steps, [r[key] for r in history], label="train")
        val = [(r["step"], r[f"val_{key}"]) for r in history if f"val_{key}" in r]
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        walked = [(r["step"], r["val_walk_tau"]) for r in history if key == "tau" and "val_walk_tau" in r]
        if walked:
            ax.plot(*zip(*walked), "s-", label="validation, decoding's path (walk)")
        ax.set_xlabel("step")
        ax.set_title({"loss": "weighted CE loss", "acc": "top-1 accuracy", "tau": "teacher-forced τ"}[key])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
