"""The experiment's result: per arm and question type the mean probe accuracy over seeds with its t interval, the
paired differences (seed as the unit) with their intervals and minimal detectable effects at 80% power, the health
lines, the verdict by the pre-stated reading (``design.READING``), the Markdown tables and the figure."""

from typing import Dict, List, Optional, Sequence

import numpy as np

from lavis_xformer.analysis.stats import mean_t_interval, minimal_detectable_effect, paired_t_interval
from lavis_xformer.datasets.shapes import QUESTION_TYPES
from lavis_xformer.experiment.design import (
    ARMS,
    CONTROL_MIN_DROP,
    DETAIL_TYPES,
    FAR_ABOVE_BASELINE,
    SMALLEST_CLAIMED_GAIN,
    Arm,
)

SCORES = tuple(QUESTION_TYPES) + ("detail",)
SCORE_LABELS = {"count_shape": "count by shape", "count_colour": "count by colour", "quadrant": "quadrant of object",
                "exists": "existence", "detail": "detail (mean of counts + quadrant)"}
#: (b, a): the differences b - a the table reports; the first two and the last decide the reading
COMPARISONS = (("xformer", "blip2"), ("xformer", "xformer_norec"), ("xformer", "blip2_2x"), ("blip2_2x", "blip2"),
               ("blip2", "control"))


def scores_of(run: dict, key: str = "accuracy") -> Dict[str, float]:
    """A run's accuracies per type plus ``detail``, the mean over ``DETAIL_TYPES``."""
    values = dict(run[key])
    values["detail"] = float(np.mean([values[t] for t in DETAIL_TYPES]))
    return values


def _interval(mean: float, low: Optional[float], high: Optional[float], n: int) -> dict:
    return {"mean": mean, "low": low, "high": high, "n": n}


def summarise(runs: Sequence[dict], standins: Sequence[dict], arms: Sequence[Arm] = ARMS,
              apply_health: bool = True) -> dict:
    """Everything the tables print, from the per-(arm, seed) results of ``train.run_arm``; ``apply_health=False``
    (smoke size) keeps unhealthy runs in and says so."""
    setup_ok = all(s["healthy"] for s in standins) or not apply_health
    healthy = {(r["arm"], r["seed"]): r for r in runs if (r["health"]["healthy"] or not apply_health) and setup_ok}
    seeds = sorted({r["seed"] for r in runs})
    summary = {"seeds": seeds, "arms": [a.name for a in arms], "labels": {a.name: a.label for a in arms},
               "failures": [f"{r['arm']} seed {r['seed']}: {r['health']['text']}" for r in runs
                            if not r["health"]["healthy"]] + [f"stand-in {s['name']}: {s['health']}"
                                                              for s in standins if not s["healthy"]],
               "accuracy": {}, "baseline": {}, "differences": {}, "above_baseline": {}, "health_applied": apply_health}
    baselines = {r["seed"]: scores_of(r, "baseline") for r in runs}
    for score in SCORES:
        summary["baseline"][score] = float(np.mean([b[score] for b in baselines.values()])) if baselines else None
    for arm in arms:
        mine = [healthy[(arm.name, s)] for s in seeds if (arm.name, s) in healthy]
        summary["accuracy"][arm.name] = {
            score: _interval(*mean_t_interval([scores_of(r)[score] for r in mine]), len(mine)) if mine else None
            for score in SCORES}
        if mine:
            above = [scores_of(r)["detail"] - baselines[r["seed"]]["detail"] for r in mine]
            summary["above_baseline"][arm.name] = _interval(*mean_t_interval(above), len(mine))
    for b, a in COMPARISONS:
        if b not in summary["arms"] or a not in summary["arms"]:
            continue
        both = [s for s in seeds if (a, s) in healthy and (b, s) in healthy]
        row = {}
        for score in SCORES:
            values_a = [scores_of(healthy[(a, s)])[score] for s in both]
            values_b = [scores_of(healthy[(b, s)])[score] for s in both]
            if len(both) < 2:
                row[score] = None
                continue
            mean, low, high = paired_t_interval(values_a, values_b)
            sd = float(np.std(np.subtract(values_b, values_a), ddof=1))
            row[score] = dict(_interval(mean, low, high, len(both)), mde80=minimal_detectable_effect(sd, len(both)))
        summary["differences"][f"{b}-{a}"] = row
    summary["at_init"], summary["after_all"], summary["query_diversity"] = {}, {}, {}
    for arm in arms:  # every run, healthy or not: these describe what training did, not the comparison
        mine = [r for r in runs if r["arm"] == arm.name and "accuracy_at_init" in r]
        if mine:
            summary["at_init"][arm.name] = {
                score: _interval(*mean_t_interval([scores_of(r, "accuracy_at_init")[score] for r in mine]), len(mine))
                for score in SCORES}
            summary["after_all"][arm.name] = {
                score: float(np.mean([scores_of(r)[score] for r in mine])) for score in SCORES}
        readings = [r["query_diversity"] for r in runs if r["arm"] == arm.name and r.get("query_diversity")]
        if readings:
            summary["query_diversity"][arm.name] = {k: float(np.mean([x[k] for x in readings])) for k in readings[0]}
    summary["verdict"], summary["reason"] = verdict(summary)
    return summary


def verdict(summary: dict):
    """(POSITIVE / NEGATIVE / INCONCLUSIVE, the sentence that says why), by ``design.READING``."""
    diffs = summary["differences"]

    def get(name, score):
        return (diffs.get(name) or {}).get(score)

    gain, rec, control = get("xformer-blip2", "detail"), get("xformer-xformer_norec", "detail"), get(
        "blip2-control", "quadrant")
    if gain is None or rec is None or control is None:
        return "INCONCLUSIVE", "fewer than 2 healthy seeds for a deciding difference"
    facts = (f"X-Former - BLIP-2 on detail {_fmt(gain)}; X-Former - X-Former w/o rec. {_fmt(rec)}; "
             f"BLIP-2 - control on quadrant {_fmt(control)}")
    if not (control["low"] > 0 and control["mean"] >= CONTROL_MIN_DROP):
        return "INCONCLUSIVE", f"the control failed (BLIP-2 - control on quadrant {_fmt(control)}, needed a lower " \
                               f"bound > 0 and a mean >= {CONTROL_MIN_DROP}): the readout or the budget is at fault"
    if gain["low"] > 0 and rec["low"] > 0:
        return "POSITIVE", facts
    above = [summary["above_baseline"].get(arm) for arm in ("blip2", "xformer")]
    far = all(x is not None and x["low"] is not None and x["low"] >= FAR_ABOVE_BASELINE for x in above)
    if far and gain["high"] < SMALLEST_CLAIMED_GAIN and -SMALLEST_CLAIMED_GAIN < rec["low"] \
            and rec["high"] < SMALLEST_CLAIMED_GAIN:
        return "NEGATIVE", facts
    why = [] if far else [f"a model is not {FAR_ABOVE_BASELINE} points above the baseline on detail"]
    return "INCONCLUSIVE", facts + "; neither reading holds" + (f" ({why[0]})" if why else
                                                               " (the intervals are too wide: see the MDEs)")


def _fmt(cell: Optional[dict], signed: bool = True) -> str:
    if cell is None:
        return "n/a"
    sign = "+" if signed else ""
    if cell["low"] is None:
        return f"{cell['mean']:{sign}.1f}"
    return f"{cell['mean']:{sign}.1f} [{cell['low']:{sign}.1f}, {cell['high']:{sign}.1f}]"


def markdown(summary: dict, header: str = "") -> str:
    """The accuracy table, the differences table and the verdict, as Markdown (printed as it is)."""
    arms, labels = summary["arms"], summary["labels"]
    lines = [header] if header else []
    lines += ["| question type | image-blind baseline | " + " | ".join(labels[a] for a in arms) + " |",
              "|---|---|" + "---|" * len(arms)]
    for score in SCORES:
        cells = [_fmt((summary["accuracy"][a] or {}).get(score), signed=False) for a in arms]
        lines.append(f"| {SCORE_LABELS[score]} | {summary['baseline'][score]:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences over seeds (points; mean [t 95% interval]; MDE80: the smallest true difference "
              "the paired t-test would detect with 80% power at this spread and number of seeds):", "",
              "| difference | " + " | ".join(SCORE_LABELS[s] for s in SCORES) + " |",
              "|---|" + "---|" * len(SCORES)]
    for name, row in summary["differences"].items():
        b, a = name.split("-")
        cells = [f"{_fmt(c)} (MDE80 {c['mde80']:.1f}, n={c['n']})" if c else "n/a" for c in (row[s] for s in SCORES)]
        lines.append(f"| {labels[b]} - {labels[a]} | " + " | ".join(cells) + " |")
    if summary.get("at_init"):
        lines += ["", "What stage 1 changed: probe accuracy on the same arm at initialisation (random trainable weights, "
                  "the same frozen stand-ins) -> after stage 1, mean over every run of the arm, healthy or not:", "",
                  "| arm | " + " | ".join(SCORE_LABELS[s] for s in SCORES) + " |", "|---|" + "---|" * len(SCORES)]
        for arm in arms:
            before, after = summary["at_init"].get(arm), summary["after_all"].get(arm)
            if before:
                lines.append(f"| {labels[arm]} | " + " | ".join(
                    f"{before[s]['mean']:.1f} -> {after[s]:.1f}" if after else f"{before[s]['mean']:.1f} -> n/a"
                    for s in SCORES) + " |")
    if summary.get("query_diversity"):
        keys = list(next(iter(summary["query_diversity"].values())))
        lines += ["", "Query diversity after stage 1 (the supplement's section-6 measure, its four readings: "
                  "`analysis.query_diversity`; mean over seeds, every run):", "",
                  "| arm | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for arm in arms:
            if arm in summary["query_diversity"]:
                lines.append(f"| {labels[arm]} | " + " | ".join(
                    f"{summary['query_diversity'][arm][k]:.4f}" for k in keys) + " |")
    if summary["failures"]:
        lines += ["", "Setup failures (left out of every difference they are in):" if summary["health_applied"] else
                  "Below the health thresholds (NOT applied at this size: kept in, so none of this is evidence):"]
        lines += [f"- {f}" for f in summary["failures"]]
    lines += ["", f"**Verdict: {summary['verdict']}** -- {summary['reason']}."]
    return "\n".join(lines) + "\n"


def figure(summary: dict, path) -> None:
    """Accuracy per question type per arm, t 95% intervals as error bars, the image-blind baseline as a dash."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for i, arm in enumerate(arms):
        cells = [(summary["accuracy"][arm] or {}).get(score) for score in SCORES]
        means = [c["mean"] if c else np.nan for c in cells]
        errors = [[c["mean"] - c["low"] if c and c["low"] is not None else 0 for c in cells],
                  [c["high"] - c["mean"] if c and c["high"] is not None else 0 for c in cells]]
        ax.bar(np.arange(len(SCORES)) + (i - (len(arms) - 1) / 2) * width, means, width, yerr=errors, capsize=2,
               label=summary["labels"][arm])
    for j, score in enumerate(SCORES):
        ax.hlines(summary["baseline"][score], j - 0.45, j + 0.45, colors="k", linestyles="--",
                  label="image-blind baseline" if j == 0 else None)
    ax.set_xticks(np.arange(len(SCORES)), [SCORE_LABELS[s].split(" (")[0] for s in SCORES])
    ax.set_ylabel("probe accuracy on fresh test images (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Linear probe on each arm's frozen stage-1 queries, {len(summary['seeds'])} seeds "
                 f"(mean, t 95% interval); verdict: {summary['verdict']}")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def health_lines(runs: List[dict], standins: List[dict]) -> List[str]:
    """One line per stand-in and per (seed, arm): what the health threshold measured, and the verdict."""
    lines = [f"stand-in {s['name']}: {s['health']} -> {'healthy' if s['healthy'] else 'SETUP FAILURE'}"
             for s in standins]
    for r in sorted(runs, key=lambda r: (r["seed"], [a.name for a in ARMS].index(r["arm"])
                                         if r["arm"] in [a.name for a in ARMS] else 99)):
        lines.append(f"seed {r['seed']} {r['arm']}: {r['health']['text']} -> "
                     f"{'healthy' if r['health']['healthy'] else 'SETUP FAILURE'}")
    return lines
