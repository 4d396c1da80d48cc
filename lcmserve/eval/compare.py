"""`lcmserve eval compare`: several eval runs in one table and one plot.

Each input is an ``lcmserve eval`` output folder (or its eval.json), optionally labelled
``PATH=LABEL``. Two kinds of plot:

- ``--x steps`` (default): FID, CLIP score and accuracy against sampling steps, one line per
  (label, sampler): the LCM against the teacher's solvers.
- ``--x label``: the metrics against the label, one line per step count: an ablation over a
  setting (numbers such as k=5 or w=8 go on a numeric axis, other labels on a categorical one),
  plus FID against CLIP score with every point named, the trade-off a guidance sweep shows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lcmserve.errors import InvalidInputError

METRICS = (("fid", "FID (lower is better)"), ("clip_score", "CLIP score"), ("accuracy", "attribute accuracy"))


def _load(spec: str) -> tuple[str, dict[str, Any]]:
    path, _, label = spec.partition("=")
    file = Path(path)
    file = file / "eval.json" if file.is_dir() else file
    try:
        result = json.loads(file.read_text())
        result["rows"]  # noqa: B018 - the shape check
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"files: {spec!r} is not an lcmserve eval result ({exc})", param="files") from exc
    return label or Path(result["config"]["model"]).name, result


def _number(label: str) -> float | None:
    match = re.search(r"-?\d+(\.\d+)?", label)
    return float(match.group()) if match else None


def merge(specs: list[str], steps: list[int] | None = None,
          samplers: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of every run (only ``steps`` and ``samplers`` when given; the real-render floor always),
    each with its run's label, guidance and prompt count."""
    if not specs:
        raise InvalidInputError("files: give at least one eval result", param="files")
    if samplers:
        from lcmserve.eval.sampling import SAMPLERS

        bad = [s for s in samplers if s not in SAMPLERS]
        if bad:
            raise InvalidInputError.out_of_range("sampler", ",".join(bad), "a list of " + ", ".join(SAMPLERS))
    rows: list[dict[str, Any]] = []
    for spec in specs:
        label, result = _load(spec)
        cfg = result["config"]
        for row in result["rows"]:
            if row["sampler"] != "real renders" and ((steps and row["steps"] not in steps)
                                                     or (samplers and row["sampler"] not in samplers)):
                continue
            suite = row.get("suite", cfg.get("split", "heldout"))  # runs before suites named their split
            rows.append({"label": label, "suite": suite, "num_images": cfg["num_images"], **row,
                         "guidance": cfg["guidance"],
                         "device": result["machine"].get("device", result["machine"].get("processor", "?"))})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["run", "suite", "sampler", "steps", "guidance", "N", "FID", "CLIP score", "accuracy", "shape", "colour", "size",
            "layout", "background"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    floors_seen = set()
    for r in rows:
        if r["sampler"] == "real renders":
            if (r["suite"], r["num_images"]) in floors_seen:
                continue
            floors_seen.add((r["suite"], r["num_images"]))
        lines.append("| " + " | ".join([
            r["label"] if r["sampler"] != "real renders" else "real renders (floor)", r["suite"],
            r["sampler"] if r["sampler"] != "real renders" else "-", str(r["steps"] or "-"), f"{r['guidance']:g}",
            str(r["num_images"]), f"{r['fid']:.1f}", f"{r['clip_score']:.2f}", f"{r['accuracy']:.3f}",
            *("-" if r.get(k) is None else f"{r[k]:.3f}" for k in ("shape", "colour", "size", "layout", "background")),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, x: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [r for r in rows if r["sampler"] != "real renders"]
    floors = {r["num_images"]: r for r in rows if r["sampler"] == "real renders"}
    ncols = 3 if x == "steps" else 4
    fig, axes = plt.subplots(1, ncols, figsize=(4.3 * ncols, 3.8))
    if x == "steps":
        for ax, (key, name) in zip(axes, METRICS):
            for label, sampler in dict.fromkeys((r["label"], r["sampler"]) for r in models):
                series = sorted((r["steps"], r[key]) for r in models if (r["label"], r["sampler"]) == (label, sampler))
                ax.plot(*zip(*series), marker="o", label=f"{label} ({sampler})" if label != sampler else label)
            for n, floor in floors.items():
                ax.axhline(floor[key], color="gray", linestyle="--", linewidth=0.8,
                           label=f"real renders (N={n})" if len(floors) > 1 else "real renders")
            ax.set_xscale("log", base=2)
            steps = sorted({r["steps"] for r in models})
            ax.set_xticks(steps, [str(s) for s in steps])
            ax.set_xlabel("sampling steps")
            ax.set_title(name)
        axes[0].legend(fontsize=7)
    else:
        labels = list(dict.fromkeys(r["label"] for r in models))
        numbers = [_number(label) for label in labels]
        numeric = all(n is not None for n in numbers) and len(set(numbers)) == len(numbers)
        position = dict(zip(labels, numbers if numeric else range(len(labels))))
        for ax, (key, name) in zip(axes, METRICS):
            for steps in sorted({r["steps"] for r in models}):
                series = sorted((position[r["label"]], r[key]) for r in models if r["steps"] == steps)
                ax.plot(*zip(*series), marker="o", label=f"{steps} step{'s' if steps > 1 else ''}")
            if numeric:
                ax.set_xscale("log")
                ax.set_xticks(numbers, labels, fontsize=8)
                ax.minorticks_off()
            else:
                ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_title(name)
        axes[0].legend(fontsize=7)
        ax = axes[3]
        for steps in sorted({r["steps"] for r in models}):
            pts = [r for r in models if r["steps"] == steps]
            ax.plot([r["clip_score"] for r in pts], [r["fid"] for r in pts], marker="o", linestyle=":",
                    label=f"{steps} steps")
            for r in pts:
                ax.annotate(r["label"], (r["clip_score"], r["fid"]), fontsize=7, textcoords="offset points",
                            xytext=(3, 3))
        ax.set_xlabel("CLIP score")
        ax.set_ylabel("FID")
        ax.set_title("FID vs CLIP score")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(specs: list[str], out: str | Path, name: str = "eval-compare", x: str = "steps",
            title: str = "", steps: list[int] | None = None, samplers: list[str] | None = None) -> dict[str, Any]:
    """Write NAME.json, NAME.md and NAME.png under ``out``; returns the merged result."""
    if x not in ("steps", "label"):
        raise InvalidInputError.out_of_range("x", x, "steps or label")
    rows = merge(specs, steps, samplers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"inputs": specs, "x": x, "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(rows))
    plot(rows, out / f"{name}.png", x, title or name)
    return result
