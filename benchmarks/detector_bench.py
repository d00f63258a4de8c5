"""Side-by-side detectors × recordings × seeds: AUROC per anomaly category, mean ± std over seeds.

Every recording is a voraus-AD parquet file (`cellwatch synth [--preset P]`); each is trained on its
own normal cycles (PRE_A) and tested on its own test split, with the paper's protocol (AUROC of each
category against all normal test cycles). One MVT-Flow per (recording, seed) is trained with the
paper's configuration and cached under --cache; the other detectors are computed from it and from the
same standardized, padded cycles:

- ``mvt-flow``: the flow's NLL (the published model);
- ``1-nn``, ``pca``: the paper's baselines;
- ``flow-local``: the flow's latent energy ½Σ_s z² per time step, per-step normalized, max over time;
- ``linres-local``: the local linear-relation residual (4 lags, 99.999 %), per signal and step,
  per-step normalized, max over signals and time; ``linres-l0``: the same without lags (99.99 %);
- ``student``, ``student-local`` (with --student): a conv net trained to regress the flow's latent z,
  scored by the squared student–teacher distance (mean over the cycle, or the local reduction);
- fusions ``a+b`` (sum) and ``a|b`` (max): each part standardized (median, scaled MAD) on the
  calibration split (normal cycles held out from training, never a test label);
- ``fused (default)``: what ``cellwatch train`` ships (flows.fusion.SignalFusion with its defaults).

Costs: training seconds of what a detector needs beyond the data (the flow's training is counted for
every detector that uses the flow) and scoring ms per cycle on this machine.

Usage: python benchmarks/detector_bench.py DATA.parquet [DATA2 ...] --seeds 177 178 179
       [--rate-divider 4] [--epochs 70] [--out benchmarks/results/detector_bench]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daemon.dataset import load_cycles
from flows.artifact import ModelCard, Threshold, load_model, save_model
from flows.baselines import OneNN, PCABaseline
from flows.fusion import FusionConfig, Normalizer, SignalFusion
from flows.metrics import per_category_auroc
from flows.mvtflow import MVTFlow, MVTFlowConfig
from flows.preprocess import Standardizer, pad_or_truncate
from flows.residual import LinearResidual, StepProfile, window_steps
from flows.training import TrainConfig, seed_everything, train_flow
from ingest.voraus.schema import ANOMALY_CATEGORIES, MACHINE_SIGNALS

ORDER = [c.name for c in ANOMALY_CATEGORIES]


def prepare(path: Path, divider: int, seed: int, cal_fraction: float) -> dict[str, Any]:
    data = load_cycles(path, MACHINE_SIGNALS, rate_divider=divider)
    rng = np.random.default_rng(seed)
    n = len(data.train)
    n_cal = max(2, round(n * cal_fraction))
    order = rng.permutation(n)
    fit, cal = data.train.subset(sorted(order[n_cal:])), data.train.subset(sorted(order[:n_cal]))
    scaler = Standardizer.fit(fit.signals)
    t = max(len(x) for x in fit.signals)

    def stack(cycles: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.stack([pad_or_truncate(scaler.transform(c), t) for c in cycles])
        return torch.from_numpy(x), torch.tensor([min(len(c), t) for c in cycles])

    return {
        "data": data,
        "scaler": scaler,
        "time_steps": t,
        "fit": stack(fit.signals),
        "cal": stack(cal.signals),
        "test": stack(data.test.signals),
        "fit_set": fit,
    }


def trained_flow(prep: dict[str, Any], seed: int, epochs: int, cache: Path) -> tuple[MVTFlow, float]:
    if (cache / "model.json").exists():
        model = load_model(cache)
        return model.flow, float(model.card.training["seconds"])
    x_fit = prep["fit"][0]
    config = MVTFlowConfig(signals=x_fit.shape[1], time_steps=x_fit.shape[2], permutation_seed=seed)
    milestones = (round(11 * epochs / 70), round(61 * epochs / 70))
    seed_everything(seed)
    flow = MVTFlow(config)
    history = train_flow(
        flow,
        x_fit,
        TrainConfig(epochs=epochs, milestones=milestones, seed=seed),
        torch.device("cpu"),
        on_epoch=lambda e, loss: print(f"  epoch {e + 1}/{epochs} loss {loss:+.4f}", flush=True),
    )
    card = ModelCard(
        signals=MACHINE_SIGNALS,
        rate_hz=prep["data"].rate_hz,
        mode="cycle",
        time_steps=x_fit.shape[2],
        window=None,
        hop=None,
        scaler=prep["scaler"],
        threshold=Threshold(1.0, 0.0, 0.01, 0.0, 1),
        architecture=config,
        training={"seconds": history.seconds, "loss": history.loss},
    )
    save_model(cache, flow, card)
    return flow, history.seconds


@torch.no_grad()
def flow_outputs(flow: MVTFlow, x: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL per cycle, latent energy per time step)."""
    nll, energy = [], []
    for i in range(0, len(x), batch):
        z, log_det = flow.transform(x[i : i + batch])
        nll.append(0.5 * z.pow(2).flatten(1).sum(1) - log_det)
        energy.append(0.5 * z.pow(2).mean(1))
    return torch.cat(nll).double(), torch.cat(energy)


class Student(torch.nn.Module):
    """The AST idea on time series: a plain (non-invertible) conv net that regresses the flow's latent z
    from x on normal cycles; where the two disagree, the data is unlike the training data."""

    def __init__(self, signals: int, hidden_scale: int = 2) -> None:
        super().__init__()
        hidden = signals * hidden_scale
        self.net = torch.nn.Sequential(
            torch.nn.Conv1d(signals, hidden, 13, dilation=2, padding="same", padding_mode="replicate"),
            torch.nn.ReLU(),
            torch.nn.Conv1d(hidden, hidden, 5, padding="same", padding_mode="replicate"),
            torch.nn.ReLU(),
            torch.nn.Conv1d(hidden, hidden, 1),
            torch.nn.ReLU(),
            torch.nn.Conv1d(hidden, signals, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def latents(flow: MVTFlow, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([flow.transform(x[i : i + batch])[0] for i in range(0, len(x), batch)])


def trained_student(
    flow: MVTFlow, x_fit: torch.Tensor, seed: int, epochs: int, cache: Path
) -> tuple[Student, float]:
    from safetensors.torch import load_file, save_file

    student = Student(x_fit.shape[1])
    path = cache / "student.safetensors"
    if path.exists():
        student.load_state_dict(load_file(str(path)))
        return student.eval(), float(json.loads((cache / "student.json").read_text())["seconds"])
    z_fit = latents(flow, x_fit)
    seed_everything(seed)
    student = Student(x_fit.shape[1])
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [round(0.8 * epochs)], 0.1)
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x_fit), generator=gen)
        total = 0.0
        for i in range(0, len(x_fit), 32):
            idx = order[i : i + 32]
            opt.zero_grad(set_to_none=True)
            loss = (student(x_fit[idx]) - z_fit[idx]).square().mean()
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        sched.step()
        print(f"  student epoch {epoch + 1}/{epochs} mse {total / len(x_fit):.4f}", flush=True)
    seconds = time.perf_counter() - started
    save_file(student.state_dict(), str(path))
    (cache / "student.json").write_text(json.dumps({"seconds": seconds}))
    return student.eval(), seconds


def run_one(
    prep: dict[str, Any], seed: int, epochs: int, cache: Path, event_s: float, student: bool = False
) -> dict[str, Any]:
    x_fit, len_fit = prep["fit"]
    x_cal, _ = prep["cal"]
    x_test, _ = prep["test"]
    rate = prep["data"].rate_hz
    width = window_steps(event_s, rate)
    flow, flow_train_s = trained_flow(prep, seed, epochs, cache)
    flow.eval()
    scores: dict[str, dict[str, np.ndarray]] = {}
    cost: dict[str, dict[str, float]] = {}

    started = time.perf_counter()
    nll_test, e_test = flow_outputs(flow, x_test)
    flow_ms = (time.perf_counter() - started) * 1e3 / len(x_test)
    nll_cal, e_cal = flow_outputs(flow, x_cal)
    _, e_fit = flow_outputs(flow, x_fit)
    profile = StepProfile.fit(e_fit, width)
    scores["mvt-flow"] = {"test": nll_test.numpy(), "cal": nll_cal.numpy()}
    cost["mvt-flow"] = {"train_s": flow_train_s, "ms_per_cycle": flow_ms}
    scores["flow-local"] = {
        "test": profile.score(e_test).double().numpy(),
        "cal": profile.score(e_cal).double().numpy(),
    }
    cost["flow-local"] = {"train_s": flow_train_s, "ms_per_cycle": flow_ms}

    if student:
        net, student_s = trained_student(flow, x_fit, seed, epochs, cache)
        with torch.no_grad():

            def distance(x: torch.Tensor) -> torch.Tensor:
                return (net(x) - latents(flow, x)).square().mean(1)

            d_fit = distance(x_fit)
            started = time.perf_counter()
            d_test = distance(x_test)
            st_ms = (time.perf_counter() - started) * 1e3 / len(x_test)
            d_cal = distance(x_cal)
        st_profile = StepProfile.fit(d_fit, width)
        scores["student"] = {"test": d_test.mean(1).double().numpy(), "cal": d_cal.mean(1).double().numpy()}
        scores["student-local"] = {
            "test": st_profile.score(d_test).double().numpy(),
            "cal": st_profile.score(d_cal).double().numpy(),
        }
        cost["student"] = cost["student-local"] = {
            "train_s": flow_train_s + student_s,
            "ms_per_cycle": flow_ms + st_ms,
        }

    singles = [torch.tensor([i]) for i in range(x_fit.shape[1])]
    for name, lags, variance in (("linres-local", 4, 0.99999), ("linres-l0", 0, 0.9999)):
        started = time.perf_counter()
        lin = LinearResidual.fit(x_fit, len_fit, variance=variance, lags=lags)
        lin_profile = StepProfile.fit(lin.energy(x_fit, singles), width)
        lin_train = time.perf_counter() - started
        started = time.perf_counter()
        test_local = lin_profile.score(lin.energy(x_test, singles))
        lin_ms = (time.perf_counter() - started) * 1e3 / len(x_test)
        cal_local = lin_profile.score(lin.energy(x_cal, singles))
        scores[name] = {"test": test_local.double().numpy(), "cal": cal_local.double().numpy()}
        cost[name] = {"train_s": lin_train, "ms_per_cycle": lin_ms}
        if name == "linres-local":
            kept = (lin, lin_profile)

    for name, model in (("1-nn", OneNN()), ("pca", PCABaseline())):
        started = time.perf_counter()
        model.fit(x_fit)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        test = model.score(x_test).numpy()
        ms = (time.perf_counter() - started) * 1e3 / len(x_test)
        scores[name] = {"test": test, "cal": model.score(x_cal).numpy()}
        cost[name] = {"train_s": train_s, "ms_per_cycle": ms}
        if isinstance(model, PCABaseline):
            pca = model

    def base(part: str) -> str:
        return "mvt-flow" if "flow" in part else "student" if "student" in part else part

    for parts in (
        ("mvt-flow", "linres-local"),
        ("mvt-flow", "pca"),
        ("linres-local", "pca"),
        ("mvt-flow", "linres-local", "pca"),
        ("mvt-flow", "flow-local", "linres-local", "pca"),
        *(
            (
                ("mvt-flow", "student"),
                ("mvt-flow", "student-local"),
                ("mvt-flow", "student", "linres-local", "pca"),
            )
            if student
            else ()
        ),
    ):
        normalized = []
        for part in parts:
            norm = Normalizer.fit(torch.from_numpy(scores[part]["cal"]))
            normalized.append({k: norm(torch.from_numpy(v)).numpy() for k, v in scores[part].items()})
        bases = {base(p) for p in parts}
        if "student" in bases:  # the student's cost already holds its teacher's
            bases.discard("mvt-flow")
        for how, reduce in (("+", np.sum), ("|", np.max))[: 2 if len(parts) == 3 else 1]:
            name = how.join(parts)
            scores[name] = {k: reduce([n[k] for n in normalized], axis=0) for k in ("test", "cal")}
            cost[name] = {
                "train_s": sum(cost[b]["train_s"] for b in bases),
                "ms_per_cycle": sum(cost[b]["ms_per_cycle"] for b in bases),
            }

    started = time.perf_counter()
    fusion = SignalFusion.fit_parts(FusionConfig(event_s=event_s), x_fit, len_fit, rate)
    fusion_train = time.perf_counter() - started
    fusion.calibrate(fusion.components(x_cal, nll_cal))
    started = time.perf_counter()
    fused_test = fusion.fuse(fusion.components(x_test, nll_test))
    fusion_ms = (time.perf_counter() - started) * 1e3 / len(x_test)
    scores["fused (default)"] = {
        "test": fused_test.numpy(),
        "cal": fusion.fuse(fusion.components(x_cal, nll_cal)).numpy(),
    }
    cost["fused (default)"] = {"train_s": flow_train_s + fusion_train, "ms_per_cycle": flow_ms + fusion_ms}

    test_set = prep["data"].test
    out: dict[str, Any] = {"detectors": {}, "cost": cost}
    for name, s in scores.items():
        result = per_category_auroc(s["test"], test_set.categories, test_set.anomaly, order=ORDER)
        out["detectors"][name] = {"per_category": result.per_category, "mean": result.mean}
    out["attribution"] = axis_attribution(prep, flow, kept[0], kept[1], pca)
    out["counts"] = result.counts
    out["normals"] = result.normals
    return out


LOCAL_TO_AXIS = ("AXIS_FRICTION", "MOTOR_COMMUTATION", "AXIS_WEIGHT")


def faulty_axis(variant: str) -> int | None:
    """The axis (0..5) a variant such as A3_B, A1_HIGH or A4_231G names, else None."""
    if len(variant) > 2 and variant[0] == "A" and variant[1].isdigit() and variant[2] == "_":
        return int(variant[1]) - 1
    return None


def axis_attribution(
    prep: dict[str, Any], flow: MVTFlow, lin: LinearResidual, lin_profile: StepProfile, pca: PCABaseline
) -> dict[str, dict[str, float]]:
    """Share of the axis-local test cycles whose most attributed axis is the faulty one, per method."""
    from flows.residual import axis_groups

    test = prep["data"].test
    picks = [
        i
        for i, (c, v) in enumerate(zip(test.categories, test.variants, strict=True))
        if c in LOCAL_TO_AXIS and faulty_axis(v) is not None
    ]
    if not picks:
        return {}
    x_fit = prep["fit"][0]
    x = prep["test"][0][picks]
    names, groups = axis_groups(MACHINE_SIGNALS)
    axes = [g for n, g in zip(names, groups, strict=True) if n.startswith("axis")]

    def grad_per_signal(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([flow.localize(batch[i : i + 16]).sum(2) for i in range(0, len(batch), 16)])

    normal_grad = grad_per_signal(x_fit[:64]).mean(0)
    mean_cycle = x_fit.mean(0)
    singles = [torch.tensor([i]) for i in range(x.shape[1])]
    with torch.no_grad():
        grad = grad_per_signal(x)
        lin_map = lin_profile.standardize(lin.energy(x, singles))  # (B, S, T)
        assert pca.mean_ is not None
        assert pca.components_ is not None
        flat = x.reshape(len(x), -1) - pca.mean_
        res = (flat - (flat @ pca.components_.T) @ pca.components_).reshape(x.shape).square().sum(2)
        flat_fit = x_fit.reshape(len(x_fit), -1) - pca.mean_
        res_fit = (flat_fit - (flat_fit @ pca.components_.T) @ pca.components_).reshape(x_fit.shape)
        res_fit = res_fit.square().sum(2).mean(0)
    per_signal = {
        "naive deviation": (x - mean_cycle).square().sum(2),
        "gradient": grad,
        "gradient / normal": grad / normal_grad.clamp_min(1e-12),
        "pca residual / normal": res / res_fit.clamp_min(1e-12),
        "linres (max over time)": lin_map.amax(2),
    }
    out: dict[str, dict[str, float]] = {}
    for method, values in per_signal.items():
        for reduce_name, reduce in (("sum", torch.sum), ("max", torch.amax)):
            per_axis = torch.stack([reduce(values[:, g], dim=1) for g in axes], dim=1)
            top = per_axis.argmax(1).tolist()
            hits: dict[str, list[bool]] = {}
            for j, i in enumerate(picks):
                hits.setdefault(test.categories[i], []).append(top[j] == faulty_axis(test.variants[i]))
            out[f"{method} [{reduce_name}]"] = {c: float(np.mean(h)) for c, h in hits.items()}
    return out


def table(results: dict[str, dict[str, Any]], recording: str) -> str:
    runs = results[recording]
    seeds = list(runs)
    detectors = list(runs[seeds[0]]["detectors"])
    counts = runs[seeds[0]]["counts"]
    lines = [
        f"### {recording} ({len(seeds)} seed(s): {', '.join(seeds)}), AUROC %, mean ± std over seeds",
        "",
    ]
    lines.append("| category | n | " + " | ".join(detectors) + " |")
    lines.append("|---|---|" + "---|" * len(detectors))
    for cat in [*counts, "mean"]:
        cells = []
        for det in detectors:
            vals = [
                100
                * (
                    runs[s]["detectors"][det]["mean"]
                    if cat == "mean"
                    else runs[s]["detectors"][det]["per_category"][cat]
                )
                for s in seeds
            ]
            cells.append(f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}")
        label = f"**{cat}**" if cat == "mean" else cat
        lines.append(f"| {label} | {counts.get(cat, '')} | " + " | ".join(cells) + " |")
    lines.append(
        "| min category | |"
        + "".join(
            f" {np.mean([min(runs[s]['detectors'][d]['per_category'].values()) for s in seeds]) * 100:.1f} |"
            for d in detectors
        )
    )
    cost = runs[seeds[0]]["cost"]
    lines.append("| train s | |" + "".join(f" {cost[d]['train_s']:.0f} |" for d in detectors))
    lines.append("| ms/cycle | |" + "".join(f" {cost[d]['ms_per_cycle']:.1f} |" for d in detectors))
    attribution = runs[seeds[0]].get("attribution", {})
    if attribution:
        cats = list(next(iter(attribution.values())))
        lines += ["", "Most attributed axis = the faulty one (share of cycles, first seed):", ""]
        lines.append("| method | " + " | ".join(cats) + " |")
        lines.append("|---|" + "---|" * len(cats))
        for method, per in attribution.items():
            lines.append(f"| {method} | " + " | ".join(f"{100 * per[c]:.0f} %" for c in cats) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[177])
    ap.add_argument("--rate-divider", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=70)
    ap.add_argument("--calibration-fraction", type=float, default=0.1)
    ap.add_argument("--event-s", type=float, default=0.3, help="moving-average width of the local scores")
    ap.add_argument("--student", action="store_true", help="also train and score the student network")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cellwatch-bench"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/detector_bench"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results: dict[str, dict[str, Any]] = {}
    if args.out.with_suffix(".json").exists():
        results = json.loads(args.out.with_suffix(".json").read_text())
    for path in args.data:
        name = path.stem
        for seed in args.seeds:
            print(f"{name} seed {seed}", flush=True)
            prep = prepare(path, args.rate_divider, seed, args.calibration_fraction)
            cache = args.cache / f"{name}-d{args.rate_divider}-e{args.epochs}-s{seed}"
            results.setdefault(name, {})[str(seed)] = run_one(
                prep, seed, args.epochs, cache, args.event_s, args.student
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
            md = "\n".join(table(results, rec) for rec in results)
            args.out.with_suffix(".md").write_text(md)
            print(table(results, name), flush=True)


if __name__ == "__main__":
    main()
