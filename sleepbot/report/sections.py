"""The sections of a report, from a comparison's results or from a plain directory of runs."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sleepbot.errors import SleepbotError
from sleepbot.report.page import SECTIONS, Figures, Section, add_table, fmt, headline_table


# ------------------------------------------------------------------------------------------- sections
def _summary(sec: Section, results: dict[str, Any]) -> None:
    from sleepbot.compare import PAIR_HEADER, pair_rows, table_notes

    for wname, w in results["workloads"].items():
        sec.html.append(f"<h3>{html.escape(wname)}</h3>")
        sec.md.append(f"### {wname}\n")
        notes = table_notes(results, wname)
        sec.text(notes[0])
        header, rows = headline_table(w)
        add_table(sec, header, rows)
        pairs = pair_rows(w)
        if pairs:
            add_table(sec, list(PAIR_HEADER), pairs)
        for n in notes[1:]:
            sec.text(n)
        base = w["arms"].get(w["baseline"], {})
        for name, a in w["arms"].items():
            sp = a.get("speedup")
            if not sp or not a.get("n"):
                continue
            drop = (a["final_test_acc"]["median"] or 0) - (base.get("final_test_acc", {}).get("median") or 0)
            verdict = (
                "faster than"
                if sp["lo"] is not None and sp["lo"] > 1
                else ("slower than" if sp["hi"] is not None and sp["hi"] < 1 else "no clear difference from")
            )
            sec.md.append(
                f"- **{name}**: {verdict} none ({fmt(sp['ratio'], 2)}x, 95% CI {fmt(sp['lo'], 2)}-"
                f"{fmt(sp['hi'], 2)}, p={fmt(sp['p_value'], 3)}); final test accuracy {drop:+.4f} vs none."
            )
            sec.html.append(
                f"<p><b>{html.escape(name)}</b>: {verdict} none ({fmt(sp['ratio'], 2)}x, 95% CI "
                f"{fmt(sp['lo'], 2)}-{fmt(sp['hi'], 2)}, p={fmt(sp['p_value'], 3)}); final test accuracy "
                f"{drop:+.4f} vs none.</p>"
            )
        sec.md.append("")


def _setup(sec: Section, results: dict[str, Any]) -> None:
    cfg = results["config"]
    sec.text(
        f"Seeds: {', '.join(map(str, cfg['seeds']))} (the same in every arm). "
        f"Each run records weight snapshots every {cfg['snapshot_every']} steps."
    )
    for wname, w in results["workloads"].items():
        sec.html.append(f"<h3>{html.escape(wname)}</h3>")
        sec.md.append(f"### {wname}\n")
        run = next(x["run"] for x in cfg["workloads"] if x["name"] == wname)
        data, model, trainer = run.get("data", {}), run.get("model", {}), run.get("trainer", {})
        sec.text(
            f"data {data.get('name', 'digits')}, arch {model.get('arch', 'small_cnn')}, "
            f"{trainer.get('max_steps', w['budget'])} steps, validation every "
            f"{trainer.get('val_every_n_steps', 10)} steps."
        )
        for opt, t in (w.get("tuning") or {}).items():
            if not t.get("grid"):
                sec.note(
                    f"{opt}: the learning rate ({fmt(t.get('lr'), 4)}) was NOT tuned: speedups may be lr effects."
                )
                continue
            sec.text(
                f"{opt}: the learning rate was tuned on seeds {t['seeds']} (never the table's seeds), rule: "
                f"{t.get('rule', 'best final val acc')}; every arm on {opt} uses the chosen lr."
            )
            steps_key = (
                next(
                    (k for k in ("median_steps_to_target", "median_steps_to_best") if k in t["table"][0]),
                    None,
                )
                if t["table"]
                else None
            )
            rows = [
                [
                    fmt(r["lr"], 4) + (" (chosen)" if r["lr"] == t["lr"] else ""),
                    str(r["n"]),
                    fmt(r["median_final_val_acc"], 4),
                    fmt(r.get(steps_key) if steps_key else None, 0),
                ]
                for r in t["table"]
            ]
            what = (
                "median steps to the target"
                if steps_key == "median_steps_to_target"
                else "median steps to the best accuracy"
            )
            add_table(sec, ["lr", "runs", "median final val acc", what], rows)
            if len(t["grid"]) > 1 and t["lr"] in (min(t["grid"]), max(t["grid"])):
                sec.note(
                    f"{opt}: the chosen lr {fmt(t['lr'], 4)} is at the edge of the grid: the best lr may lie beyond "
                    "it, and this optimizer may be under-tuned. Extend the grid to be sure."
                )
    rows = []
    for a in cfg["arms"]:
        s = dict(a["sleep"])
        strategy = s.pop("strategy")
        rows.append(
            [
                a["name"],
                strategy,
                a.get("optimizer", ""),
                ", ".join(f"{k}={v}" for k, v in sorted(s.items())) or "defaults",
                a.get("chosen_on") or "-",
            ]
        )
    add_table(sec, ["arm", "strategy", "base optimizer", "sleep settings", "settings chosen on"], rows)


def _dynamics(sec: Section, out: Path, results: dict[str, Any], workload: str) -> None:
    from sleepbot.analysis import fit_asymptote, layer_dynamics
    from sleepbot.compare import load_runs

    sec.text(
        "Asymptote: a fit of a - b exp(-t / tau) to each run's validation curve; saturation step: where the fit "
        "comes within 0.01 of its asymptote. Layer settled: the first step from which the relative spread of the "
        "layer's neuron norms changes by at most 1e-4 per step until the end (medians over seeds; '-' = never)."
    )
    groups = load_runs(out, workload)
    rows = []
    layer_rows = []
    layer_names: list[str] = []
    for arm, runs in groups.items():
        fits = []
        for r in runs:
            if len(r.get("val_acc") or []) >= 3:
                fits.append(fit_asymptote(r["val_step"], r["val_acc"]))
        if fits:
            sat = [f.saturation_step for f in fits]
            rows.append(
                [
                    arm,
                    str(len(fits)),
                    fmt(float(np.median([f.value for f in fits])), 4),
                    fmt(float(np.median(sat)), 0),
                    f"{sum(f.saturated for f in fits)}/{len(fits)}",
                    fmt(float(np.median([f.r2 for f in fits])), 3),
                ]
            )
        settled: dict[str, list[float]] = {}
        for r in runs:
            path = r.get("record_path")
            if not path or not Path(path).is_file():
                continue
            from sleepbot.store import RunFile, StoreError

            try:
                with RunFile(path) as f:
                    for name, d in layer_dynamics(f).items():
                        settled.setdefault(name, []).append(
                            np.inf if d.settled_step is None else d.settled_step
                        )
            except StoreError:
                continue
        if settled:
            layer_names = layer_names or list(settled)
            cells = []
            for name in layer_names:
                v = float(np.median(settled.get(name, [np.inf])))
                cells.append("-" if not math.isfinite(v) else fmt(v, 0))
            layer_rows.append([arm, *cells])
    if rows:
        add_table(sec, ["arm", "runs", "asymptote (median)", "saturation step", "saturated", "fit R^2"], rows)
    if layer_rows:
        add_table(sec, ["arm", *[f"{n} settled at" for n in layer_names]], layer_rows)


def _run_files(out: Path, results: dict[str, Any], workload: str) -> dict[str, str]:
    """One recorded run per arm, all of the same seed (the first seed), for the per-run figures."""
    seed = results["config"]["seeds"][0]
    paths = {}
    for rec in results["runs"]:
        if rec["workload"] == workload and rec["seed"] == seed:
            p = out / "runs" / f"{rec['stem']}.h5"
            if p.is_file():
                paths[rec["arm"]] = str(p)
    return paths


def _forecast(sec: Section, figs: Figures, forecaster: str | None, run_path: str | None) -> None:
    if run_path is None:
        sec.note("No recorded run to forecast.")
        return
    from sleepbot.viz.forecast import plot_forecast

    which = f"the forecaster {forecaster}" if forecaster else "the shipped default forecaster"
    sec.text(
        f"Forecast against actual for sample weights of a run of the comparison (a seed the forecaster was not "
        f"trained on): {which}'s prediction and linear extrapolation, from the same context, against the "
        f"recorded trajectory."
    )
    figs.add(
        sec,
        "forecast",
        lambda: plot_forecast(run_path, forecaster=forecaster),
        f"forecast vs actual: {Path(run_path).stem}",
    )


def compare_sections(src: Path, figs: Figures, forecaster: str | None, animation: bool, command: str | None):
    from sleepbot.compare import load_results
    from sleepbot.viz.curves import plot_learning_curves, plot_steps_to_target
    from sleepbot.viz.norms import plot_norms
    from sleepbot.viz.response import animate_response, compute_responses, has_ffmpeg, plot_response_grid

    results = load_results(src)
    secs = {k: Section(k) for k in SECTIONS}
    _summary(secs["summary"], results)
    _setup(secs["setup"], results)
    for wname in results["workloads"]:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in wname)
        secs["curves"].html.append(f"<h3>{html.escape(wname)}</h3>")
        secs["curves"].md.append(f"### {wname}\n")
        figs.add(
            secs["curves"],
            f"curves_{safe}",
            lambda w=wname: plot_learning_curves(src, workload=w),
            f"{wname}: validation accuracy, median over seeds with interquartile band; ticks = sleeps",
        )
        figs.add(
            secs["steps"],
            f"steps_{safe}",
            lambda w=wname: plot_steps_to_target(results, workload=w),
            f"{wname}: steps to target per seed",
        )
        secs["dynamics"].html.append(f"<h3>{html.escape(wname)}</h3>")
        secs["dynamics"].md.append(f"### {wname}\n")
        _dynamics(secs["dynamics"], src, results, wname)
    # Per-run figures: the first workload, the first seed, the baseline and the most interesting sleeping arm.
    w0 = next(iter(results["workloads"]))
    files = _run_files(src, results, w0)
    base_arm = results["workloads"][w0]["baseline"]
    sleeper = next((a for a in ("learned", "linear") if a in files), None) or next(
        (a for a in files if a != base_arm), None
    )
    for arm in [a for a in (base_arm, sleeper) if a in files]:
        figs.add(
            secs["norms"],
            f"norms_{arm}",
            lambda a=arm: plot_norms(files[a]),
            f"{w0}, arm {arm}, seed {results['config']['seeds'][0]}: per-neuron norms (lines, heatmap) and the "
            "relative spread with its rate of change",
        )
    if base_arm in files:
        try:
            resp = compute_responses(files[base_arm])
        except SleepbotError as e:
            secs["response"].note(f"not drawn ({e})")
            resp = None
        if resp is not None:
            secs["response"].text(
                "Each layer's output for an all-ones input, rebuilt from the run's weight snapshots "
                "(columns: layers; rows: steps; red positive, blue negative, one colour scale per layer)."
            )
            figs.add(
                secs["response"],
                "response_grid",
                lambda: plot_response_grid(files[base_arm], responses=resp),
                f"all-ones response over training ({base_arm}, seed {results['config']['seeds'][0]})",
            )
            if animation:
                gif = figs.dir / "response.gif"
                figs.add(
                    secs["response"],
                    "response_gif",
                    lambda: animate_response(files[base_arm], gif, responses=resp),
                    "the same, animated over every snapshot",
                )
                if has_ffmpeg():
                    try:
                        mp4 = animate_response(files[base_arm], figs.dir / "response.mp4", responses=resp)
                        secs["response"].text(f"MP4 version: {figs.dir.name}/{mp4.name}")
                    except SleepbotError as e:
                        secs["response"].note(f"MP4 not written ({e})")
    else:
        secs["norms"].note("No recorded run of the baseline was found.")
        secs["response"].note("No recorded run of the baseline was found.")
    if forecaster is None:
        for a in results["config"]["arms"]:
            if a["sleep"].get("strategy") == "learned" and a["sleep"].get("forecaster"):
                forecaster = a["sleep"]["forecaster"]
    _forecast(secs["forecast"], figs, forecaster, files.get(base_arm))
    _reproduce(secs["reproduce"], src, results, command)
    return [secs[k] for k in SECTIONS], f"sleepbot comparison: {', '.join(results['workloads'])}"


def _reproduce(sec: Section, src: Path, results: dict[str, Any], command: str | None) -> None:
    sec.text(
        f"Every run's result is in {src}/runs/ (one JSON and one HDF5 recording per run); the statistics are in "
        f"results.json and results.csv; the resolved comparison is compare_config.json. Rerunning the same "
        f"command skips finished runs."
    )
    cmd = (
        command
        or f"sleepbot compare --config <the compare YAML> --out {src}\nsleepbot report {src} --overwrite"
    )
    sec.html.append(f"<pre>{html.escape(cmd)}</pre>")
    sec.md.append(f"```\n{cmd}\n```\n")
    errors = results.get("errors") or {}
    if errors:
        sec.note(f"{len(errors)} run(s) failed and are left out of the statistics:")
        rows = [[k, v] for k, v in sorted(errors.items())]
        add_table(sec, ["run", "error"], rows)
    cfg = json.dumps(results["config"], indent=1)
    sec.html.append(
        f"<details><summary>resolved compare config</summary><pre>{html.escape(cfg)}</pre></details>"
    )
    sec.md.append(f"<details><summary>resolved compare config</summary>\n\n```json\n{cfg}\n```\n</details>\n")


def runs_sections(src: Path, figs: Figures, animation: bool):
    """A report on a plain directory of run files (a `collect` output): no arms, no statistics."""
    from sleepbot.store import RunFile, StoreError
    from sleepbot.viz._io import run_paths
    from sleepbot.viz.curves import plot_learning_curves
    from sleepbot.viz.norms import plot_norms
    from sleepbot.viz.response import animate_response, compute_responses, plot_response_grid

    paths = run_paths(src)
    secs = {k: Section(k) for k in SECTIONS}
    rows = []
    first = None
    for p in paths:
        try:
            with RunFile(p) as f:
                s = f.summary()
                if first is None and f.complete:
                    first = p
        except StoreError as e:
            rows.append([p.name, "unreadable", str(e)] + ["-"] * 5)
            continue
        rows.append(
            [s["file"], s["status"], s["dataset"], s["arch"], s["optimizer"], fmt(s["lr"], 4), str(s["seed"]),
             fmt(s["val_acc"], 4)]
        )  # fmt: skip
    first = first or paths[0]
    secs["summary"].text(f"{len(paths)} recorded run(s) in {src}; no comparison (no results.json).")
    add_table(
        secs["summary"],
        ["file", "status", "dataset", "arch", "optimizer", "lr", "seed", "final val acc"],
        rows,
    )
    secs["setup"].note(
        "A directory of runs has no arms, target or tuned learning rate: see `sleepbot compare`."
    )
    figs.add(
        secs["curves"],
        "curves",
        lambda: plot_learning_curves(src, zoom=False),
        "validation accuracy by strategy",
    )
    secs["steps"].note("Steps to target need a comparison (`sleepbot compare`).")
    secs["dynamics"].note(
        "Per-arm statistics need a comparison; the norm figure below shows the settling signal."
    )
    figs.add(secs["norms"], "norms", lambda: plot_norms(first), f"per-neuron norms: {first.stem}")
    try:
        resp = compute_responses(first)
        figs.add(
            secs["response"], "response_grid", lambda: plot_response_grid(first, responses=resp), first.stem
        )
        if animation:
            gif = figs.dir / "response.gif"
            figs.add(
                secs["response"],
                "response_gif",
                lambda: animate_response(first, gif, responses=resp),
                "animated",
            )
    except SleepbotError as e:
        secs["response"].note(f"not drawn ({e})")
    secs["forecast"].note("Give `sleepbot report --forecaster FILE` on a comparison to plot forecasts.")
    secs["reproduce"].text(f"sleepbot report {src} --overwrite")
    return [secs[k] for k in SECTIONS], f"sleepbot runs: {src.name}"
