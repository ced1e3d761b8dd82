"""One training leg: AdamW with warmup and a cosine schedule, the router load-balancing loss per
layer, gradient clipping, periodic saves; and the thread tuner that keeps a 2-core machine busy."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from lynx_compile.training import state
from lynx_compile.training.data import TrainBatches


PEAK_LR = 2e-3
FINAL_LR_FRACTION = 0.1
WARMUP_STEPS = 100
RESUME_WARMUP_STEPS = 25  # a resumed leg keeps Adam's moments: a short warmup is enough
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
LOG_EVERY = 25


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))


def cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy; with ``reduction="none"`` shaped (B, T-1)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                                             reduction=reduction)


def balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss of each MoE layer, averaged over layers.

    Uses transformers' own ``load_balancing_loss_func`` one layer at a time: given all layers at
    once it pools their statistics before taking the product, which does not balance each layer.
    Equals ``top_k`` when a layer's routing is perfectly balanced.
    """
    losses = [load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]
    return torch.stack(losses).mean()


def learning_rate(step: int, progress: float, peak_lr: float = PEAK_LR, warmup_steps: int = WARMUP_STEPS) -> float:
    """Linear warmup over steps, then cosine from ``peak_lr`` to FINAL_LR_FRACTION * peak_lr over progress.

    ``step`` and ``progress`` count within one leg: each leg is one warm restart (SGDR, Loshchilov &
    Hutter 2017), so a leg's budget need not be known when the first leg starts.
    """
    warmup = min(1.0, (step + 1) / warmup_steps)
    cosine = FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak_lr * warmup * cosine


class ThreadTuner:
    """Chooses 1 or ``max_threads`` intra-op threads by measured step time.

    With other work on a 2-core machine, 2 threads can be twice as slow as 1 (each parallel op
    waits for its descheduled half). Every ``period`` steps the other setting runs for ``probe``
    steps, and the faster of the two (median step time over ``probe`` steps) is kept.
    """

    def __init__(self, max_threads: int, period: int = 50, probe: int = 5):
        self.choices = sorted({1, max_threads})
        self.period, self.probe = period, probe
        self.times: dict[int, list[float]] = {n: [] for n in self.choices}
        self.steps = {n: 0 for n in self.choices}
        torch.set_num_threads(max_threads)

    def record(self, seconds: float) -> None:
        threads = torch.get_num_threads()
        self.times[threads] = (self.times[threads] + [seconds])[-self.probe:]
        self.steps[threads] += 1
        if len(self.choices) == 1:
            return
        phase = sum(self.steps.values()) % self.period
        if phase == self.period - self.probe:
            torch.set_num_threads(next(n for n in self.choices if n != threads))
        elif phase == 0:
            torch.set_num_threads(min(self.choices, key=lambda n: statistics.median(self.times[n])))


@dataclass(frozen=True)
class LegPlan:
    """What one leg of training runs: its budget and its learning-rate cycle."""

    minutes: float  # wall-clock budget of the training loop
    steps: int | None  # a fixed step count instead (exactly repeatable), or None
    peak_lr: float
    warmup_steps: int
    max_threads: int
    save_every_minutes: float  # periodic saves, so a killed leg loses at most this much


def train(model, optimizer, batches: TrainBatches, plan: LegPlan, progress: state.Progress, leg: dict,
          save=lambda: None, should_stop=lambda: False) -> None:
    """Run one leg: until its budget is used or ``should_stop()``; updates ``progress`` and ``leg``.

    ``save()`` is called every ``plan.save_every_minutes``; the caller saves once more at the end.
    """
    threads = ThreadTuner(plan.max_threads)
    config = model.config
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    model.train()
    start = last_save = time.monotonic()
    leg_steps, leg_tokens, recent = 0, 0, []
    while True:
        elapsed = time.monotonic() - start
        fraction = leg_steps / plan.steps if plan.steps else elapsed / (60 * plan.minutes)
        if fraction >= 1.0:
            leg["status"] = "finished"
            break
        if should_stop():
            leg["status"] = "interrupted"
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(leg_steps, fraction, plan.peak_lr, plan.warmup_steps)
        step_start = time.monotonic()
        input_ids = next(batches)
        out = model(input_ids=input_ids, output_router_logits=True)
        ce = cross_entropy(out.logits, input_ids)
        aux = balance_loss(out.router_logits, num_experts, config.num_experts_per_tok)
        (ce + config.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        leg_steps, leg_tokens = leg_steps + 1, leg_tokens + input_ids.numel()
        progress.step, progress.tokens = progress.step + 1, progress.tokens + input_ids.numel()
        threads.record(time.monotonic() - step_start)
        recent.append(ce.item())
        leg.update(steps=leg_steps, tokens=leg_tokens, minutes=round((time.monotonic() - start) / 60, 2),
                   steps_by_threads={str(n): count for n, count in threads.steps.items()})
        if progress.step % LOG_EVERY == 0:
            mean_ce = sum(recent) / len(recent)
            progress.curve.append([progress.step, round(mean_ce, 4)])
            recent = []
            print(f"step {progress.step:6d}  leg {leg['leg']} {elapsed / 60:5.1f} min  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  ce {mean_ce:.4f}  balance {aux.item():.3f}  "
                  f"{leg_tokens / max(elapsed, 1e-9):.0f} tok/s  {torch.get_num_threads()} threads", flush=True)
        if time.monotonic() - last_save >= 60 * plan.save_every_minutes:
            save()
            last_save = time.monotonic()
