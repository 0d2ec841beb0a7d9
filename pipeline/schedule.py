"""The learning-rate schedule every Kiln training loop uses (train, distill, prune's recovery).

Linear warmup from lr/warmup to `lr` over `warmup` steps, then cosine decay to `min_lr` at `steps` (held there
after), or warmup-stable-decay (`train.schedule: wsd`): `lr` held until the last `train.decay_frac` of the steps,
then a linear decay to `min_lr`. Pure: the step alone decides the rate, so a resumed run continues the same curve.
`kiln train` records the schedule in every checkpoint; `on_resume` decides what a resumed run whose
config asks for another schedule (e.g. more train.steps) follows, and says so.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, steps: int, lr: float, min_lr: float, warmup: int, decay_frac: float) -> float:
    """Linear warmup, `lr` held, then a linear decay to `min_lr` over the last `decay_frac` of `steps`. Until the
    decay starts the rate does not depend on `steps`: a stable-phase checkpoint can be extended or decayed."""
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_start = steps - max(1, round(decay_frac * steps))
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / (steps - decay_start))
    return lr + (min_lr - lr) * progress


# A schedule as a checkpoint records it (JSON): {"kind", "warmup", "steps", "lr", "min_lr"} (+ "decay_frac" for
# wsd). Kinds map to their rate functions; a new kind is one entry here and one in `describe`.
KINDS = {"cosine": lambda step, s: warmup_cosine(step, s["steps"], s["lr"], s["min_lr"], s["warmup"]),
         "wsd": lambda step, s: warmup_stable_decay(step, s["steps"], s["lr"], s["min_lr"], s["warmup"],
                                                    s["decay_frac"])}


def schedule_of(train: dict) -> dict:
    """The schedule a `train` config section (as a dict, e.g. a checkpoint's saved config) asks for."""
    kind = train.get("schedule", "cosine")
    s = {"kind": kind, "warmup": train["warmup_steps"], "steps": train["steps"], "lr": train["lr"],
         "min_lr": train["min_lr"]}
    if kind == "wsd":
        s["decay_frac"] = train.get("decay_frac", 0.2)
    return s


def lr_of(step: int, schedule: dict) -> float:
    return KINDS[schedule["kind"]](step, schedule)


def describe(s: dict) -> str:
    decay = f", decaying over the last {s['decay_frac']:.0%}" if s["kind"] == "wsd" else ""
    return f"{s['kind']}: warmup {s['warmup']}, lr {s['lr']:.2e} -> {s['min_lr']:.2e} over {s['steps']} steps{decay}"


def on_resume(recorded: dict, configured: dict, step: int) -> tuple[dict, str | None]:
    """The schedule a run resumed after `step` steps follows, and (when the config asks for another) the line
    that says so before its first step.

    The configured schedule is taken when it gives every step already trained the rate it had: then it changes
    only the future (more steps while still warming up; a warmup-stable-decay run extended in its stable phase).
    Otherwise the recorded schedule continues as logged: never re-stretched, and past its last step the rate
    stays at its min lr (a cosine run extended after it finished trains on at min lr).
    """
    if configured == recorded:
        return recorded, None
    probe = sorted({*range(0, step, max(1, step // 4096)), max(0, step - 1)}) if step else []
    if all(math.isclose(lr_of(s, configured), lr_of(s, recorded), rel_tol=1e-9, abs_tol=0.0) for s in probe):
        return configured, (f"resuming at step {step} on the configured schedule ({describe(configured)}); "
                            f"it gives the steps already trained the rates they had ({describe(recorded)})")
    tail = (f"; from step {recorded['steps']} on it stays at {recorded['min_lr']:.2e}"
            if configured["steps"] > recorded["steps"] else "")
    return recorded, (f"resuming at step {step}: the learning rate continues the checkpoint's schedule "
                      f"({describe(recorded)}), not the configured one ({describe(configured)}), which would change "
                      f"the rates of steps already trained{tail}; train.steps={configured['steps']} sets where "
                      "training stops (a new schedule: a new --out with train.init_from)")
