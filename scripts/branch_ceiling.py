"""How predictable is a run's future at all? Branch one run into K copies that differ only in their data order.

    python scripts/branch_ceiling.py --data digits --arch small_cnn --optimizer adam --lr 0.01 \
        --seeds 800 801 802 --steps 50 100 200 --horizons 20 50 100 200 --branches 8 \
        [--forecaster shipped=sleepbot/assets/forecaster.pt] [--dmd 8] [--large-batch 2 8] --json out.json \
        [--markdown out.md]
    python scripts/branch_ceiling.py --no-branch-stats ... --target 0.96 --max-steps 500 --json sim.json
    python scripts/branch_ceiling.py --from-json out.json sim.json --markdown tables.md

A forecaster sees a run's path up to the jump (its weights, perhaps its optimizer's state); it cannot see which
minibatches the next steps will draw. So the best any forecaster can do is the mean of the future given the run's
state now (weights and optimizer state, the data known), and R2_disp against the one future that happened is
capped by how much the future varies with the data order alone. This script measures that cap directly. It
trains one run (a plain loop with the project's architectures, optimizers, data and batch size; minibatches drawn
without replacement per epoch, as the Trainer's shuffled loader draws them) to each step t of --steps, copies the
network and the optimizer's state, and continues K copies for up to max(--horizons) steps, each with its own data
order. At every horizon h (in steps) it reports, pooled over all parameters and per parameter tensor:

- `r2_ceiling`: R2_disp of the conditional mean against one branch's displacement, 1 - sigma^2 / E|d|^2, with
  sigma^2 estimated without bias from the branches (the leave-one-out mean's error times (K - 1) / K);
- `r2_other_branch`: R2_disp of another branch's displacement (foresight of a different data order);
- `cos_mean`: the mean cosine between one branch's displacement and the mean of the others';
- for the path's least-squares trend, each `--forecaster` and `Sleep("dmd")` at each `--dmd` rank, all reading
  the trunk's snapshots 10 steps apart: R2_disp against the branches as it is and at its best scalar length, its
  cosine with the branches' mean, and the training loss where its jump lands;
- probes: the mean displacement of the first 1 or 4 branches after a shorter horizon, stretched to h, against the
  mean of the other branches (does a straight stretch of a few of the steps to come land where the mean does?);
- with --large-batch M: one branch trained on batches M times as large, scored like a forecaster (is the
  branches' mean what a larger batch would do?);

and the training loss (whole training split) and validation accuracy at: the weights now, each branch's end (mean
over branches), and the mean of the first k branches' ends for k = 2, 4, ..., K (a conditional-mean jump: does
the average of possible futures land as well as a future itself?).

With --target it also simulates sleep in the same loop, on every seed: none; the oracle, which every
--sleep-every steps jumps --sleep-horizon steps ahead to one fresh branch's future; and the mean of K branches'
futures (a perfect conditional-mean forecaster); with --large-batch M also jumps to one branch's future on
batches M times as large, and no sleep on such batches. The run keeps its own optimizer state after a jump; the
branches' steps are not counted (these are ceilings, not methods). It gives steps to the target with the compare
harness's paired BCa interval.

It answers whether the goals R2_disp >= 0.5 and "75% of the oracle's saving" are within reach of any forecaster
of these runs, and whether the conditional mean, what a forecaster trained on a squared error estimates, is a
place worth jumping to. Every number comes from real training: 10-30 s a seed on one core for the statistics, a
few minutes a workload for the simulation. Schedule-Free optimizers are not supported (their evaluated point is
not their parameters).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless minibatch indices: a fresh permutation each epoch, the last incomplete batch dropped."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size {batch_size} for {n} examples; it must be 1 to {n}")
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def flat_params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in net.named_parameters()}


def flat_vector(params: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The tensors `names` of `params` as one float64 vector, in that order (`unflat` inverts it)."""
    return torch.cat([params[n].reshape(-1).double() for n in names])


def unflat(x: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: tensor} shaped and typed as `like`, from one flat vector in `like`'s order."""
    out, o = {}, 0
    for n, v in like.items():
        out[n] = x[o : o + v.numel()].reshape(v.shape).to(v.dtype)
        o += v.numel()
    return out


def evaluate(net: torch.nn.Module, params: dict[str, torch.Tensor], data: dict) -> dict[str, float]:
    """Training loss over the whole training split and validation accuracy at `params` (no_grad, eval mode; the
    network's own parameters and mode are left as they were)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(net, params, (x,))

    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            xt, yt = data["train"]
            loss = sum(
                float(F.cross_entropy(run(xt[i : i + 1024]), yt[i : i + 1024], reduction="sum"))
                for i in range(0, len(xt), 1024)
            ) / len(xt)
            xv, yv = data["val"]
            acc = float((run(xv).argmax(1) == yv).float().mean())
    finally:
        net.train(was_training)
    return {"train_loss": loss, "val_acc": acc}


def train_steps(net, opt, data, it, n: int, record: set[int] | None = None) -> dict[int, dict]:
    """`n` optimizer steps on minibatches from the index iterator `it`; the parameters after each step in
    `record` (counted from 1)."""
    x, y = data["train"]
    out = {}
    net.train()
    for s in range(1, n + 1):
        idx = next(it)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
        if record and s in record:
            out[s] = flat_params(net)
    return out


def branch(
    net, opt, args, data: dict, seed: int, n: int, record: set[int], batch_multiple: int = 1
) -> dict[int, dict]:
    """A copy of the network and its optimizer state trained `n` more steps with a data order of its own
    (`seed`), on batches `batch_multiple` times args.batch_size; its parameters after each step in `record`."""
    from sleepbot.models import build_optimizer

    bnet = copy.deepcopy(net)
    bopt = build_optimizer(args.optimizer, bnet.parameters(), args.lr, momentum=args.momentum)
    bopt.load_state_dict(copy.deepcopy(opt.state_dict()))
    size = args.batch_size * batch_multiple
    order = batches(len(data["train"][0]), size, torch.Generator().manual_seed(seed))
    return train_steps(bnet, bopt, data, order, n, record)


def branch_stats(now: dict, ends: list[dict], names: list[str]) -> dict[str, float]:
    """R2 ceiling, another branch's R2 and the cosine to the others' mean, pooled over `names`."""
    k = len(ends)
    d = [flat_vector({n: e[n] - now[n] for n in names}, names) for e in ends]
    sst = sum(float(x.pow(2).sum()) for x in d) / k
    if sst == 0:  # nothing moved (lr 0): no R2 to speak of
        return {
            "r2_ceiling": float("nan"),
            "r2_other_branch": float("nan"),
            "cos_mean": float("nan"),
            "disp_norm": 0.0,
        }
    total = torch.stack(d).sum(0)
    loo = [(total - x) / (k - 1) for x in d]
    loo_sse = sum(float((x - m).pow(2).sum()) for x, m in zip(d, loo)) / k
    pair_sse = sum(float((d[i] - d[j]).pow(2).sum()) for i in range(k) for j in range(k) if i != j) / (
        k * (k - 1)
    )
    cos = sum(float((x * m).sum() / (x.norm() * m.norm()).clamp_min(1e-300)) for x, m in zip(d, loo)) / k
    return {
        "r2_ceiling": 1 - (k - 1) / k * loo_sse / sst,
        "r2_other_branch": 1 - pair_sse / sst,
        "cos_mean": cos,
        "disp_norm": math.sqrt(sst),
    }


def large_batch_stats(
    net: torch.nn.Module, now: dict, big: dict[int, dict], ends: list[dict], names: list[str], data: dict
) -> dict[str, float]:
    """Is the branches' mean the future of a larger batch? For each multiple M in `big` (M -> the parameters of
    one branch trained on batches M times as large, from the same state, as many steps as the branches in `ends`),
    its displacement scored as a prediction of theirs, as `score_predictor` scores a forecaster (label `batchMx`),
    and the training loss and validation accuracy where it lands (`loss_batchMx`, `acc_batchMx`)."""
    f0 = flat_vector(now, names)
    d = [flat_vector(e, names) - f0 for e in ends]
    out = {}
    for m, end in big.items():
        out.update(score_predictor(f"batch{m}x", flat_vector(end, names) - f0, d))
        at = evaluate(net, end, data)
        out[f"loss_batch{m}x"], out[f"acc_batch{m}x"] = at["train_loss"], at["val_acc"]
    return out


def steps_to_target(
    seed: int, args, data, dm, jump: int, jump_batch: int = 1, run_batch: int = 1
) -> tuple[int | None, int, dict]:
    """Steps until the validation accuracy (checked every 10 steps) reaches args.target, in a run that every
    `sleep_every` steps jumps to the mean of `jump` branches' weights `sleep_horizon` steps ahead (jump 0: never
    sleeps). The branches start from the run's weights and optimizer state with data orders of their own and
    batches `jump_batch` times args.batch_size; the run's own batches are `run_batch` times it. After the jump the
    run keeps its own optimizer state (Sleep's `keep`). `sleep_every` and `sleep_horizon` are args'. Returns
    (steps or None on a miss, jumps, trace): the trace holds [step, training loss, validation accuracy] at every
    check ("checks") and right after every jump ("landed"), so a jump's landing can be told from what the run
    keeps of it."""
    from sleepbot.models import build_arch, build_optimizer

    sleep_every, sleep_horizon = args.sleep_every, args.sleep_horizon
    torch.manual_seed(seed)
    net = build_arch(args.arch, dm.input_shape, dm.num_classes)
    opt = build_optimizer(args.optimizer, net.parameters(), args.lr, momentum=args.momentum)
    n_train = len(data["train"][0])
    trunk = batches(n_train, args.batch_size * run_batch, torch.Generator().manual_seed(seed))
    jumps, trace = 0, {"checks": [], "landed": []}
    for step in range(10, args.max_steps + 1, 10):
        train_steps(net, opt, data, trunk, 10)
        at = evaluate(net, flat_params(net), data)
        trace["checks"].append([step, at["train_loss"], at["val_acc"]])
        if at["val_acc"] >= args.target:
            return step, jumps, trace
        if jump and step % sleep_every == 0 and step < args.max_steps:
            ends = [
                branch(
                    net,
                    opt,
                    args,
                    data,
                    10_000 * seed + step + 1_000_000 * (b + 1),
                    sleep_horizon,
                    {sleep_horizon},
                    jump_batch,
                )[sleep_horizon]
                for b in range(jump)
            ]
            with torch.no_grad():
                for k, p in net.named_parameters():
                    p.copy_(torch.stack([e[k] for e in ends]).mean(0))
            jumps += 1
            at = evaluate(net, flat_params(net), data)
            trace["landed"].append([step, at["train_loss"], at["val_acc"]])
    return None, jumps, trace


def simulate(args, data, dm) -> dict:
    """Steps to the target for: no sleep; the oracle (one branch's future: foresight of a data order); the
    conditional-mean oracle (the mean of --branches branches' futures); for each --large-batch M, one branch's
    future on batches M times as large, and no sleep on such batches; each seed paired over the arms."""
    arms = {
        "none": (0, 1, 1),
        "oracle (one branch)": (1, 1, 1),
        f"mean of {args.branches} branches": (args.branches, 1, 1),
    }
    for m in args.large_batch:
        arms[f"one branch at batch x{m}"] = (1, m, 1)
        arms[f"none at batch x{m}"] = (0, 1, m)
    out: dict = {
        "target": args.target,
        "sleep_every": args.sleep_every,
        "sleep_horizon": args.sleep_horizon,
        "max_steps": args.max_steps,
        "seeds": {},
    }
    for seed in args.seeds:
        got = {}
        for arm, (k, jump_batch, run_batch) in arms.items():
            steps, jumps, trace = steps_to_target(seed, args, data, dm, k, jump_batch, run_batch)
            got[arm] = {"steps": steps, "jumps": jumps, "trace": trace}
        out["seeds"][seed] = got
        print(f"seed {seed}: " + ", ".join(f"{a} {v['steps']}" for a, v in got.items()), flush=True)
    summarize_simulation(out)
    return out


def summarize_simulation(sim: dict) -> None:
    """Add each arm's median steps, misses and speedup over none (the compare harness's paired BCa interval of
    the ratio of medians, and the Wilcoxon p) to a simulation's result, and the branches' mean against the
    one-branch oracle under "pair" (and under "pairs", with the branches' mean against each larger batch's
    future); computed from the per-seed steps."""
    from sleepbot.analysis import paired_speedup

    cap = 2 * sim["max_steps"]  # a miss counts as twice the budget (AlgoPerf's and NiNo's rule)
    seeds = list(sim["seeds"].values())
    arms = list(seeds[0])

    def of(arm: str) -> list[float]:
        return [cap if v[arm]["steps"] is None else v[arm]["steps"] for v in seeds]

    for arm in arms:
        sp = paired_speedup(of("none"), of(arm))
        misses = sum(v[arm]["steps"] is None for v in seeds)
        sim[arm] = {
            "median_steps": _median(of(arm)),
            "misses": misses,
            "speedup": sp.ratio,
            "lo": sp.lo,
            "hi": sp.hi,
            "p_value": sp.p_value,
        }
        print(
            f"{arm}: median {sim[arm]['median_steps']:g} steps, {misses} misses, speedup over none "
            f"{sp.ratio:.2f}x [{sp.lo:.2f}, {sp.hi:.2f}] (paired BCa 95%), Wilcoxon p {sp.p_value:.3f}",
            flush=True,
        )
    sim["pairs"] = []
    for vs in [arms[1]] + [a for a in arms if a.startswith("one branch at batch")]:
        sp = paired_speedup(of(vs), of(arms[2]))
        sim["pairs"].append(
            {"arm": arms[2], "vs": vs, "speedup": sp.ratio, "lo": sp.lo, "hi": sp.hi, "p_value": sp.p_value}
        )
    sim["pair"] = sim["pairs"][0]


def _median(xs) -> float:
    return float(np.median(xs))


def _no_score(label: str) -> dict[str, float]:
    return {
        f"r2_{label}": float("nan"),
        f"r2_{label}_best_length": float("nan"),
        f"cos_{label}": float("nan"),
    }


def score_predictor(label: str, pred: torch.Tensor, d: list[torch.Tensor]) -> dict[str, float]:
    """R2_disp of the displacement `pred` against each branch's displacement in `d` (pooled), the same at the
    best scalar length for the branches' mean (an oracle's choice), and the cosine with that mean."""
    sst = sum(float(v.pow(2).sum()) for v in d)
    if sst == 0:  # nothing moved
        return _no_score(label)
    mean = torch.stack(d).mean(0)
    best = float((pred @ mean) / (pred @ pred).clamp_min(1e-300))
    return {
        f"r2_{label}": 1 - sum(float((v - pred).pow(2).sum()) for v in d) / sst,
        f"r2_{label}_best_length": 1 - sum(float((v - best * pred).pow(2).sum()) for v in d) / sst,
        f"cos_{label}": float((pred @ mean) / (pred.norm() * mean.norm()).clamp_min(1e-300)),
    }


def trend_stats(
    snaps: dict[int, dict],
    t: int,
    h: int,
    ends: list[dict],
    names: list[str],
    net: torch.nn.Module | None = None,
    data: dict | None = None,
) -> dict[str, float]:
    """R2_disp against the branches of the history's least-squares trend (the last up to 20 snapshots 10 steps
    apart, extrapolated h steps), as it is and at its best scalar length (an oracle's choice), and its cosine with
    the branches' mean: what a forecaster that reads only the path gets here. With `net` and `data`, also the
    training loss where its jump lands (`loss_trend`)."""
    steps = [s for s in sorted(snaps) if s <= t][-20:]
    flat = lambda m: flat_vector(m, names)  # noqa: E731
    hist = torch.stack([flat(snaps[s]) for s in steps])  # [T, P]
    x = torch.tensor(steps, dtype=torch.float64)
    x = x - x.mean()
    slope = (x[:, None] * (hist - hist.mean(0))).sum(0) / x.pow(2).sum()
    pred = slope * h
    now = hist[-1]
    out = score_predictor("trend", pred, [flat(e) - now for e in ends])
    if net is not None and data is not None:
        out["loss_trend"] = evaluate(net, unflat(now + pred, {n: snaps[t][n] for n in names}), data)[
            "train_loss"
        ]
    return out


def markdown(result: dict) -> str:
    """The medians of a result (this script's JSON) as Markdown tables."""
    a, rows, out = result["args"], result["rows"], []
    head = (
        f"{a['data']} / {a['arch']} / {a['optimizer']} lr {a['lr']}, batch {a['batch_size']}, seeds "
        f"{', '.join(map(str, a['seeds']))}, {a['branches']} branches"
    )
    if rows:
        labels = (
            ["trend"]
            + list(a.get("forecaster_labels", []))
            + [f"batch{m}x" for m in a.get("large_batch", [])]
        )

        def title(x: str) -> str:
            if x == "trend":
                return "the trend"
            if x.startswith("batch") and x.endswith("x") and x[5:-1].isdigit():
                return f"one branch, batch x{x[5:-1]}"
            return x

        out += [
            f"**{head}**: branched at steps {', '.join(map(str, a['steps']))}; medians over (seed, step); each "
            f"predictor as R2_disp as it is / at its best length (its cosine with the branches' mean); the "
            f"training loss where its jump lands",
            "",
            "| horizon (steps) | R2 ceiling | another branch | "
            + " | ".join(title(x) for x in labels)
            + " | train loss now / one branch / mean of branches |",
            "|---|---|---|" + "---|" * len(labels) + "---|",
        ]
        for h in sorted({r["horizon"] for r in rows}):
            sel = [r for r in rows if r["horizon"] == h]

            def med(f, sel=sel) -> float:
                xs = [x for x in (f(r) for r in sel) if not math.isnan(x)]
                return _median(xs) if xs else float("nan")

            k = max(int(n.split()[2]) for n in sel[0]["points"] if n.startswith("mean of "))
            loss = " / ".join(
                f"{med(lambda r, n=n: r['points'][n]['train_loss']):.3f}"
                for n in ("now", "one branch (mean over branches)", f"mean of {k} branches")
            )

            def q(key: str, med=med) -> float:
                return med(lambda row: row["pooled"][key])

            cells = [f"{q('r2_ceiling'):.3f}", f"{q('r2_other_branch'):.3f}"] + [
                f"{q(f'r2_{x}'):.2f} / {q(f'r2_{x}_best_length'):.3f} ({q(f'cos_{x}'):.2f})"
                + (f"; lands {q(f'loss_{x}'):.3f}" if f"loss_{x}" in sel[0]["pooled"] else "")
                for x in labels
            ]
            out.append(f"| {h} | " + " | ".join(cells) + f" | {loss} |")
        out.append("")
        h = max(r["horizon"] for r in rows)
        sel = [r for r in rows if r["horizon"] == h]
        where = [
            (n, lambda r, n=n: (r["points"][n]["train_loss"], r["points"][n]["val_acc"]))
            for n in sel[0]["points"]
        ] + [
            (
                title(f"batch{m}x"),
                lambda r, m=m: (r["pooled"][f"loss_batch{m}x"], r["pooled"][f"acc_batch{m}x"]),
            )
            for m in a.get("large_batch", [])
        ]
        out += [
            f"Where each point lands {h} steps on: training loss / validation accuracy (medians)",
            "",
            "| " + " | ".join(n for n, _ in where) + " |",
            "|" + "---|" * len(where),
            "| "
            + " | ".join(
                f"{_median([f(r)[0] for r in sel]):.3f} / {_median([f(r)[1] for r in sel]):.3f}"
                for _, f in where
            )
            + " |",
            "",
        ]
        sel = [r for r in rows if r["horizon"] == h and r.get("probes")]
        if sel:
            out += [
                f"Taking some of the steps: the mean displacement of K branches after h' steps against the mean of "
                f"the other branches after {h} (medians; training loss where it lands)",
                "",
                "| K | h' | cosine | loss stretched to the horizon | loss at its best length | loss at the mean |",
                "|---|---|---|---|---|---|",
            ]
            for i, pr in enumerate(sel[0]["probes"]):

                def pm(key: str, i: int = i) -> float:
                    return _median([r["probes"][i][key] for r in sel])

                out.append(
                    f"| {pr['branches']} | {pr['probe_steps']} | {pm('cos'):.2f} | {pm('loss_stretched'):.3f} | "
                    f"{pm('loss_best_length'):.3f} | {pm('loss_at_mean'):.3f} |"
                )
            out.append("")
    sim = result.get("simulation")
    if sim:
        out += [
            f"**{head}**: simulated sleep every {sim['sleep_every']} steps, {sim['sleep_horizon']} steps ahead, "
            f"to val acc {sim['target']} within {sim['max_steps']} steps (a miss counts 2x)",
            "",
            "| arm | median steps | misses | speedup over none [95% CI] | Wilcoxon p |",
            "|---|---|---|---|---|",
        ]
        summarize_simulation(sim)
        for arm in (k for k in sim if isinstance(sim[k], dict) and "median_steps" in sim[k]):
            v = sim[arm]
            out.append(
                f"| {arm} | {v['median_steps']:g} | {v['misses']} | {v['speedup']:.2f}x [{v['lo']:.2f}, "
                f"{v['hi']:.2f}] | {v['p_value']:.3f} |"
            )
        out.append("")
        for q in sim["pairs"]:
            out.append(
                f"{q['arm']} against {q['vs']}, paired: {q['speedup']:.2f}x [{q['lo']:.2f}, {q['hi']:.2f}], "
                f"Wilcoxon p {q['p_value']:.3f}."
            )
        out.append("")
        kept = jump_keeps(sim)
        if kept:
            out += [
                "What the run keeps of a jump (medians over every jump of every seed): validation accuracy / training "
                "loss at the check before the jump, right after it, and at the next check 10 steps on",
                "",
                "| arm | jumps | before | landed | 10 steps on |",
                "|---|---|---|---|---|",
            ]
            for arm, v in kept.items():
                out.append(
                    f"| {arm} | {v['jumps']} | "
                    + " | ".join(
                        f"{v[k + '_acc']:.3f} / {v[k + '_loss']:.3f}" for k in ("before", "landed", "after")
                    )
                    + " |"
                )
            out.append("")
    return "\n".join(out)


def jump_keeps(sim: dict) -> dict[str, dict]:
    """Per simulated arm that jumped: the median validation accuracy and training loss at the check before each
    jump, right after it, and at the check after it (10 steps on; jumps whose run stopped first are left out). Empty
    for results without traces."""
    got: dict[str, dict[str, list]] = {}
    for arms in sim["seeds"].values():
        for arm, v in arms.items():
            trace = v.get("trace")
            if not trace or not trace["landed"]:
                continue
            checks = {c[0]: c for c in trace["checks"]}
            for step, loss, acc in trace["landed"]:
                if step + 10 not in checks:
                    continue
                g = got.setdefault(arm, {k: [] for k in ("before", "landed", "after")})
                g["before"].append(checks[step][1:])
                g["landed"].append([loss, acc])
                g["after"].append(checks[step + 10][1:])
    out = {}
    for arm, g in got.items():
        out[arm] = {"jumps": len(g["landed"])}
        for k, xs in g.items():
            out[arm][k + "_loss"] = _median([x[0] for x in xs])
            out[arm][k + "_acc"] = _median([x[1] for x in xs])
    return out


def probe_stats(
    net: torch.nn.Module, now: dict, ends: dict[int, list[dict]], h: int, names: list[str], data: dict
) -> list[dict]:
    """What taking some of the steps would tell: the mean displacement of the first K branches after h' < h steps
    (K = 1: what h' more training steps show), against the mean of the other branches after h. Its cosine with
    that mean, and the training loss where it lands stretched to h (now + h / h' x the probe) and at its best
    scalar length for the mean (an oracle's choice), beside the loss at the mean itself."""
    flat = lambda m: flat_vector(m, names)  # noqa: E731
    f0 = flat(now)
    like = {n: now[n] for n in names}

    rows = []
    for k in (1, 4):
        if k + 2 > len(ends[h]):
            continue
        target = torch.stack([flat(e) - f0 for e in ends[h][k:]]).mean(0)
        at_target = evaluate(net, unflat(f0 + target, like), data)["train_loss"]
        for hp in sorted(x for x in ends if x < h):
            probe = torch.stack([flat(e) - f0 for e in ends[hp][:k]]).mean(0)
            best = float((probe @ target) / (probe @ probe).clamp_min(1e-300))
            rows.append(
                {
                    "branches": k,
                    "probe_steps": hp,
                    "cos": float((probe @ target) / (probe.norm() * target.norm()).clamp_min(1e-300)),
                    "best_length": best,
                    "loss_stretched": evaluate(net, unflat(f0 + h / hp * probe, like), data)["train_loss"],
                    "loss_best_length": evaluate(net, unflat(f0 + best * probe, like), data)["train_loss"],
                    "loss_at_mean": at_target,
                }
            )
    return rows


class StrategyPredictor:
    """A sleep strategy read as a forecaster (`context`, `predict(history, horizon, kind=...)`), so that its
    proposal is scored like a forecaster's: e.g. `dmd`, which fits a whole layer at once."""

    def __init__(self, strategy) -> None:
        reads = strategy.defaults()  # how the strategy reads the history in a Sleep callback
        self.strategy, self.context = strategy, int(reads.get("context", 20))
        self.min_context = int(reads.get("min_context", self.context))

    def predict(self, history: torch.Tensor, horizon: int, *, kind: str = "linear") -> torch.Tensor:
        from sleepbot.errors import SleepbotError
        from sleepbot.sleep.base import LayerContext

        if history.shape[0] < self.min_context:
            raise SleepbotError(f"{history.shape[0]} snapshots; needs {self.min_context}")
        steps = torch.arange(history.shape[0]) * 10
        ctx = LayerContext(layer="", kind=kind, step=int(steps[-1]), steps=steps, snapshot_every=10)
        return self.strategy.propose(history, horizon, ctx)


def forecaster_stats(
    net: torch.nn.Module,
    snaps: dict[int, dict],
    t: int,
    h: int,
    ends: list[dict],
    forecasters: dict,
    data: dict | None = None,
) -> dict[str, float]:
    """R2_disp against the branches of each forecaster's jump h steps ahead (h / 10 snapshots; the forecasters
    read snapshots 10 steps apart, as recorded in their corpus), from the trunk's history up to step t, pooled over
    the neuron layers (weights and biases, as the recorder lays them out); its best length and cosine as for the
    trend; with `data`, also the training loss where its jump lands (`loss_LABEL`). NaN where a forecaster cannot
    forecast (horizon beyond its training, history too short)."""
    from sleepbot.errors import SleepbotError
    from sleepbot.neurons import has_bias, layer_kind, neuron_layers, neuron_rows

    layers = neuron_layers(net)

    def matrix(params: dict, name: str) -> torch.Tensor:
        return neuron_rows(
            params[f"{name}.weight"], params.get(f"{name}.bias") if has_bias(layers[name]) else None
        )

    steps = [s for s in sorted(snaps) if s <= t and (t - s) % 10 == 0]
    out = {}
    for label, fc in forecasters.items():
        pred, true = [], [[] for _ in ends]
        try:
            if h % 10:
                raise SleepbotError(f"horizon {h} is not a whole number of 10-step snapshots")
            landed = dict(snaps[t])
            for name, module in layers.items():
                hist = torch.stack([matrix(snaps[s], name) for s in steps[-fc.context :]])
                new = fc.predict(hist, h // 10, kind=layer_kind(module))
                pred.append((new - hist[-1]).reshape(-1))
                for k, e in enumerate(ends):
                    true[k].append((matrix(e, name) - hist[-1]).reshape(-1))
                weight = landed[f"{name}.weight"]
                landed[f"{name}.weight"] = new[:, : weight[0].numel()].reshape(weight.shape)
                if has_bias(module):
                    landed[f"{name}.bias"] = new[:, -1]
        except SleepbotError:
            out.update(_no_score(label))
            if data is not None:
                out[f"loss_{label}"] = float("nan")
            continue
        out.update(score_predictor(label, torch.cat(pred).double(), [torch.cat(x).double() for x in true]))
        if data is not None:
            out[f"loss_{label}"] = evaluate(net, landed, data)["train_loss"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[800, 801, 802])
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200], help="where to branch")
    p.add_argument("--horizons", type=int, nargs="+", default=[20, 50, 100, 200], help="in steps")
    p.add_argument("--branches", type=int, default=8)
    p.add_argument("--train-subset", type=int, default=None, help="keep this many training examples")
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="also simulate sleep: steps to this validation accuracy for none, the oracle and the branches' mean",
    )
    p.add_argument("--sleep-every", type=int, default=50)
    p.add_argument("--sleep-horizon", type=int, default=200, help="steps ahead of each simulated jump")
    p.add_argument("--max-steps", type=int, default=1000, help="budget of each simulated run")
    p.add_argument("--no-branch-stats", action="store_true", help="only the simulation")
    p.add_argument(
        "--forecaster",
        nargs="*",
        default=[],
        metavar="LABEL=PATH",
        help="also score these forecasters against the branches (e.g. shipped=sleepbot/assets/forecaster.pt)",
    )
    p.add_argument(
        "--dmd",
        type=int,
        nargs="*",
        default=[],
        metavar="RANK",
        help="also score Sleep('dmd') at these ranks, each layer fitted from its last up to 20 snapshots",
    )
    p.add_argument(
        "--large-batch",
        type=int,
        nargs="*",
        default=[],
        metavar="M",
        help="also train one branch on batches M times as large and score its future as a prediction of the "
        "branches' (is their mean a larger batch's future?); with --target, also simulate jumps to it and no "
        "sleep on such batches",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="also write the medians as Markdown tables here")
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="F",
        help="only print (and with --markdown write) the tables of results this script wrote",
    )
    args = p.parse_args(argv)
    if args.from_json:
        text = "\n".join(markdown(json.loads(Path(f).read_text())) for f in args.from_json)
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text)
        return 0
    if args.branches < 2:
        p.error("--branches must be >= 2 (the ceiling is estimated from their spread)")

    from sleepbot.config import DataConfig
    from sleepbot.data import make_datamodule
    from sleepbot.errors import SleepbotError, unknown_name
    from sleepbot.models import OPTIMIZERS, SCHEDULE_FREE_OPTIMIZERS, build_arch, build_optimizer

    if args.optimizer in SCHEDULE_FREE_OPTIMIZERS:
        p.error(
            "Schedule-Free optimizers are not supported here (their evaluated point is not the parameters)"
        )
    try:
        dm = make_datamodule(
            DataConfig(name=args.data, batch_size=args.batch_size, train_subset=args.train_subset), seed=0
        )
        build_arch(args.arch, dm.input_shape, dm.num_classes)
        if args.optimizer not in OPTIMIZERS:
            raise unknown_name("optimizer", args.optimizer, OPTIMIZERS)
    except SleepbotError as e:
        p.error(str(e))
    forecasters = {}
    args.forecaster_labels = []
    for spec in args.forecaster:
        label, _, path = spec.partition("=")
        if not label.isidentifier() or not path:
            p.error(f"--forecaster takes LABEL=PATH with LABEL a plain name, got {spec!r}")
        try:
            from sleepbot.forecast import load_forecaster

            forecasters[label] = load_forecaster(path)
            args.forecaster_labels.append(label)
        except SleepbotError as e:
            p.error(str(e))
    for rank in args.dmd:
        from sleepbot.sleep import make_strategy

        try:
            forecasters[f"dmd{rank}"] = StrategyPredictor(make_strategy("dmd", rank=rank))
        except SleepbotError as e:
            p.error(str(e))
        args.forecaster_labels.append(f"dmd{rank}")
    data = {k: dm.tensors[k] for k in ("train", "val")}
    n_train = len(data["train"][0])
    for m in [1, *args.large_batch]:
        if m < 1 or args.batch_size * m > n_train:
            p.error(
                f"a batch of {args.batch_size} x {m} for {n_train} training examples; --batch-size and each "
                f"--large-batch multiple must give 1 to {n_train}"
            )
    horizons = sorted(set(args.horizons))
    rows = []
    for seed in [] if args.no_branch_stats else args.seeds:
        t0 = time.time()
        torch.manual_seed(seed)
        net = build_arch(args.arch, dm.input_shape, dm.num_classes)
        opt = build_optimizer(args.optimizer, net.parameters(), args.lr, momentum=args.momentum)
        trunk = batches(n_train, args.batch_size, torch.Generator().manual_seed(seed))
        names = [k for k, _ in net.named_parameters()]
        done = 0
        snaps = {0: flat_params(net)}  # the trunk's weights every 10 steps, for the trend's history
        for t in sorted(args.steps):
            got = train_steps(net, opt, data, trunk, t - done, set(range(10 - done % 10, t - done + 1, 10)))
            snaps.update({done + s: v for s, v in got.items()})
            done = t
            now = flat_params(net)
            ends: dict[int, list[dict]] = {h: [] for h in horizons}
            for b in range(args.branches):
                got = branch(
                    net, opt, args, data, 10_000 * seed + 100 * t + b + 1, horizons[-1], set(horizons)
                )
                for h in horizons:
                    ends[h].append(got[h])
            big = {
                m: branch(
                    net,
                    opt,
                    args,
                    data,
                    5_000_000 + 10_000 * seed + 100 * t + m,
                    horizons[-1],
                    set(horizons),
                    m,
                )
                for m in args.large_batch
            }
            for h in horizons:
                e = ends[h]
                row = {"seed": seed, "step": t, "horizon": h, "branches": len(e)}
                row["pooled"] = branch_stats(now, e, names)
                row["pooled"].update(trend_stats(snaps, t, h, e, names, net, data))
                row["pooled"].update(forecaster_stats(net, snaps, t, h, e, forecasters, data))
                row["pooled"].update(
                    large_batch_stats(net, now, {m: v[h] for m, v in big.items()}, e, names, data)
                )
                row["per_tensor"] = {n: branch_stats(now, e, [n]) for n in names}
                row["probes"] = probe_stats(net, now, ends, h, names, data)
                pts = {"now": evaluate(net, now, data)}
                each = [evaluate(net, x, data) for x in e]
                pts["one branch (mean over branches)"] = {
                    k: sum(s[k] for s in each) / len(each) for k in each[0]
                }
                k = 2
                while k <= len(e):
                    mean = {n: torch.stack([x[n] for x in e[:k]]).mean(0) for n in names}
                    pts[f"mean of {k} branches"] = evaluate(net, mean, data)
                    k *= 2
                row["points"] = pts
                rows.append(row)
                s = row["pooled"]
                print(
                    f"seed {seed} step {t} h {h}: R2 ceiling {s['r2_ceiling']:.3f}, other branch "
                    f"{s['r2_other_branch']:.3f}, cos to the others' mean {s['cos_mean']:.3f}; "
                    + "; ".join(f"{n} {v['train_loss']:.4f}/{v['val_acc']:.3f}" for n, v in pts.items()),
                    flush=True,
                )
        print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)
    summary = {}
    for h in horizons if rows else []:
        sel = [r for r in rows if r["horizon"] == h]
        summary[h] = {
            key: _median([r["pooled"][key] for r in sel])
            for key in ("r2_ceiling", "r2_other_branch", "r2_trend", "r2_trend_best_length", "cos_trend")
        }
        print(
            f"horizon {h} steps, median over {len(sel)} (seed, step): R2 ceiling {summary[h]['r2_ceiling']:.3f}, "
            f"another branch {summary[h]['r2_other_branch']:.3f}, the trend {summary[h]['r2_trend']:.3f} (at its "
            f"best length {summary[h]['r2_trend_best_length']:.3f}, cosine {summary[h]['cos_trend']:.3f})"
        )
    sim = simulate(args, data, dm) if args.target is not None else None
    result = {"args": vars(args), "rows": rows, "summary": summary, "simulation": sim}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # the figures do not depend on it; two runs side by side on 2 cores
    raise SystemExit(main())
