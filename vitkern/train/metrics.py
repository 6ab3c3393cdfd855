"""What a run reports: OUT/metrics.csv and OUT/metrics.jsonl (one row per optimizer step, the same
numbers), OUT/summary.json, OUT/curves.png and a progress bar. Only rank 0 writes."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Any, Dict, List

COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "img_per_s", "mfu", "peak_mem_mb", "skipped_images",
           "eval_loss", "eval_accuracy", "wall_s")


class MetricsLog:
    """OUT/metrics.csv: a header row (COLUMNS), then one row per step. Empty cells mean "not
    measured at this step" (eval_* appear every --eval-every steps). On resume the rows after the
    checkpoint's step (logged by the killed run after its last save) are dropped."""

    def __init__(self, out: str, resume_step: int = 0) -> None:
        self.path = os.path.join(out, "metrics.csv")
        self.jsonl = os.path.join(out, "metrics.jsonl")
        self.rows: List[Dict[str, Any]] = []
        if resume_step > 0 and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                self.rows = [_parse(r) for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows([{k: _fmt(r.get(k)) for k in COLUMNS} for r in self.rows])
        with open(self.jsonl, "w") as f:
            f.writelines(_json_line(r) for r in self.rows)

    def log(self, row: Dict[str, Any]) -> None:
        self.rows.append(dict(row))
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        with open(self.jsonl, "a") as f:
            f.write(_json_line(row))


def _json_line(row: Dict[str, Any]) -> str:
    clean = {k: (None if isinstance(row.get(k), float) and math.isnan(row[k]) else row.get(k)) for k in COLUMNS}
    return json.dumps(clean) + "\n"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly: a resumed run's rows compare bit-for-bit
    return str(value)


def _parse(row: Dict[str, str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in row.items():
        if v in ("", None):
            out[k] = None
        elif k in ("step", "epoch", "skipped_images"):
            out[k] = int(v)
        else:
            out[k] = float(v)
    return out


def read_metrics(out: str) -> List[Dict[str, Any]]:
    """OUT/metrics.csv as a list of dicts (numbers parsed, empty cells None)."""
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return [_parse(r) for r in csv.DictReader(f)]


def write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def plot_curves(rows: List[Dict[str, Any]], path: str, title: str, accuracy_label: str = "held-out accuracy") -> None:
    """Training loss (and held-out loss) per step on the left, held-out accuracy on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = [r["step"] for r in rows if r.get("loss") is not None]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    ax_loss.plot(steps, losses, lw=0.8, alpha=0.45, color="tab:blue", label="train loss (per step)")
    if len(losses) >= 20:  # a running mean makes the trend readable under per-batch noise
        w = max(5, len(losses) // 50)
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(losses))]
        ax_loss.plot(steps, smooth, lw=1.6, color="tab:blue", label=f"train loss ({w}-step mean)")
    ev = [r for r in rows if r.get("eval_loss") is not None]
    if ev:
        ax_loss.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", color="tab:orange",
                     label="held-out loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    acc = [r for r in rows if r.get("eval_accuracy") is not None]
    if acc:
        ax_acc.plot([r["step"] for r in acc], [100 * r["eval_accuracy"] for r in acc], "o-", color="tab:green",
                    label=accuracy_label)
        last = acc[-1]
        ax_acc.annotate(f"{100 * last['eval_accuracy']:.1f}%", (last["step"], 100 * last["eval_accuracy"]),
                        textcoords="offset points", xytext=(-10, -16), ha="right")
        ax_acc.legend(loc="lower right")
    else:
        ax_acc.text(0.5, 0.5, "no held-out evaluation in this run", ha="center", va="center",
                    transform=ax_acc.transAxes)
    ax_acc.set_ylim(0, 100)
    ax_acc.set_xlabel("optimizer step")
    ax_acc.set_ylabel(f"{accuracy_label} (%)")
    ax_acc.set_title("accuracy")
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


class Progress:
    """A tqdm bar when tqdm is installed (and enabled), else one plain line every ~5% of the run."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.bar = None
        self.last_print = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def update(self, step: int, info: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = ", ".join(f"{k}={v}" for k, v in info.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
            return
        now = time.monotonic()
        if step == self.total or step % max(1, self.total // 20) == 0 or now - self.last_print > 30:
            self.last_print = now
            print(f"step {step}/{self.total}: {text}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
