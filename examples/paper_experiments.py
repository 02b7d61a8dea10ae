"""Ioffe & Szegedy (2015) on real data, with bnkernels' own layers.

    python examples/paper_experiments.py [--quick] --out DIR

Data: scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the package),
1,297 for training and a stratified 500 held out for testing.

1. Figure 1: a fully connected network, 3 hidden layers of 100 sigmoid units, with and
   without bnkernels.BatchNorm1d before each nonlinearity; SGD, mini-batches of 60. Test
   accuracy against training steps, and the 15th/50th/85th percentiles of one last-hidden-
   layer sigmoid's input (on the test set) over training (the paper's Figure 1b/1c).
2. Learning rate: the BN network at 1x, 5x and 30x the baseline's learning rate, against the
   baseline at 1x and 5x: steps to reach the baseline's (1x) final test accuracy, and which
   runs diverge (a non-finite loss, or a final training loss 1.5x that of uniform guessing).
3. The same two questions for a small convolutional network, with bnkernels.BatchNorm2d
   (ReLU units) or none.
Every configuration runs over several seeds; the summary gives mean and spread.

Writes DIR/results.json and DIR/fig1_mlp.png, DIR/learning_rate.png, DIR/cnn.png.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bnkernels  # noqa: E402

BATCH = 60
PERCENTILES = (0.15, 0.50, 0.85)
# A run diverged if its loss went non-finite, or its training loss over the last evaluation
# interval ends above 1.5 x ln(10), the loss of a uniform guess over the 10 classes.
DIVERGED_LOSS = 1.5 * math.log(10)


def load_digits(device):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=500, stratify=y, random_state=0)
    return [t.to(device) for t in (x_tr, y_tr, x_te, y_te)]


class MLP(nn.Module):
    """64 -> 3 x (Linear 100 [-> BatchNorm1d] -> sigmoid) -> 10. `probe` is the input of the
    first sigmoid of the last hidden layer (after BN where there is one)."""

    def __init__(self, bn: bool):
        super().__init__()
        layers, width = [], 64
        for _ in range(3):
            layers.append(nn.Linear(width, 100, bias=not bn))
            layers.append(bnkernels.BatchNorm1d(100) if bn else nn.Identity())
            width = 100
        self.hidden = nn.ModuleList(layers)
        self.out = nn.Linear(100, 10)
        self.probe = None

    def forward(self, x):
        for i in range(0, len(self.hidden), 2):
            pre = self.hidden[i + 1](self.hidden[i](x))
            x = torch.sigmoid(pre)
        self.probe = pre[:, 0].detach()
        return self.out(x)


class CNN(nn.Module):
    """8x8x1 -> conv 16 [-> BN] -> ReLU -> pool -> conv 32 [-> BN] -> ReLU -> pool -> fc 10."""

    def __init__(self, bn: bool):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=not bn),
                                 bnkernels.BatchNorm2d(cout) if bn else nn.Identity(),
                                 nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, 16), block(16, 32))
        self.out = nn.Linear(32 * 2 * 2, 10)
        self.probe = None

    def forward(self, x):
        return self.out(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def train(kind, bn, lr, seed, steps, eval_every, data):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = (MLP if kind == "mlp" else CNN)(bn).to(x_tr.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    record = dict(steps=[], test_acc=[], train_loss=[], percentiles=[], diverged=False)
    losses = []
    order, pos = torch.randperm(len(x_tr), generator=gen), 0
    for step in range(steps + 1):
        if step % eval_every == 0:
            model.eval()
            with torch.no_grad():
                acc = (model(x_te).argmax(1) == y_te).float().mean().item()
                if model.probe is not None:
                    q = torch.quantile(model.probe.float(), torch.tensor(PERCENTILES, device=x_te.device))
                    record["percentiles"].append([round(v, 4) for v in q.tolist()])
            model.train()
            record["steps"].append(step)
            record["test_acc"].append(round(acc, 4))
            record["train_loss"].append(round(statistics.fmean(losses), 4) if losses else None)
            losses = []
        if step == steps:
            break
        if pos + BATCH > len(order):
            order, pos = torch.randperm(len(x_tr), generator=gen), 0
        idx = order[pos:pos + BATCH].to(x_tr.device)
        pos += BATCH
        loss = loss_fn(model(x_tr[idx]), y_tr[idx])
        if not torch.isfinite(loss):
            record["diverged"] = True
            break
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if (record["train_loss"][-1] or 0.0) > DIVERGED_LOSS:
        record["diverged"] = True
    return record


def steps_to(record, target):
    for step, acc in zip(record["steps"], record["test_acc"]):
        if acc >= target:
            return step
    return None


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(mean=statistics.fmean(values), std=statistics.pstdev(values),
                min=min(values), max=max(values), n=len(values))


def experiment(kind, base_lr, steps, eval_every, seeds, data, configs):
    """configs: (bn, lr multiplier). Returns the runs and their summary, where the target is
    the mean final test accuracy of the baseline (no BN, 1x)."""
    runs = []
    for bn, mult in configs:
        for seed in seeds:
            t0 = time.perf_counter()
            rec = train(kind, bn, base_lr * mult, seed, steps, eval_every, data)
            rec.update(model=kind, bn=bn, lr_mult=mult, lr=base_lr * mult, seed=seed,
                       seconds=round(time.perf_counter() - t0, 2))
            runs.append(rec)
            print(f"{kind} bn={bn!s:5} lr x{mult:<3} seed {seed}: final test acc "
                  f"{rec['test_acc'][-1]:.3f}{' (diverged)' if rec['diverged'] else ''}", flush=True)
    baseline = [r for r in runs if not r["bn"] and r["lr_mult"] == 1]
    target = statistics.fmean(r["test_acc"][-1] for r in baseline)
    base_steps = _mean_spread([steps_to(r, target) for r in baseline])
    summary = dict(target_test_acc=round(target, 4), configs=[])
    for bn, mult in configs:
        group = [r for r in runs if r["bn"] == bn and r["lr_mult"] == mult]
        reach = [steps_to(r, target) for r in group]
        entry = dict(bn=bn, lr_mult=mult, final_test_acc=_mean_spread([r["test_acc"][-1] for r in group]),
                     steps_to_target=_mean_spread(reach),
                     reached=sum(s is not None for s in reach), runs=len(group),
                     diverged=sum(r["diverged"] for r in group))
        if entry["steps_to_target"] and base_steps and min(base_steps["mean"], entry["steps_to_target"]["mean"]) > 0:
            entry["steps_ratio_vs_baseline"] = round(base_steps["mean"] / entry["steps_to_target"]["mean"], 2)
        summary["configs"].append(entry)
    return runs, summary


def plot(out, runs, summaries):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curves(ax, group, label, key="test_acc"):
        steps = group[0]["steps"]
        n = min(len(r[key]) for r in group)
        values = [[r[key][i] for r in group] for i in range(n)]
        mean = [statistics.fmean(v) for v in values]
        ax.plot(steps[:n], mean, label=label)
        ax.fill_between(steps[:n], [min(v) for v in values], [max(v) for v in values], alpha=0.2)

    def pick(kind, bn, mult):
        return [r for r in runs if r["model"] == kind and r["bn"] == bn and r["lr_mult"] == mult]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    curves(axes[0], pick("mlp", False, 1), "without BN")
    curves(axes[0], pick("mlp", True, 1), "with bnkernels.BatchNorm1d")
    axes[0].set(title="(a) test accuracy, MLP 3x100 sigmoid", xlabel="training steps",
                ylabel="test accuracy")
    axes[0].legend()
    for ax, bn, title in ((axes[1], False, "(b) without BN"), (axes[2], True, "(c) with BN")):
        group = pick("mlp", bn, 1)
        steps = group[0]["steps"]
        for j, p in enumerate(PERCENTILES):
            n = min(len(r["percentiles"]) for r in group)
            ax.plot(steps[:n], [statistics.fmean(r["percentiles"][i][j] for r in group)
                                for i in range(n)], label=f"{int(p * 100)}th percentile")
        ax.set(title=f"{title}: input of a last-layer sigmoid", xlabel="training steps")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig1_mlp.png", dpi=100)

    for kind, name in (("mlp", "learning_rate.png"), ("cnn", "cnn.png")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for entry in summaries[kind]["configs"]:
            group = pick(kind, entry["bn"], entry["lr_mult"])
            curves(ax, group, f"{'BN' if entry['bn'] else 'no BN'}, lr x{entry['lr_mult']}"
                   f"{' (diverged)' if entry['diverged'] else ''}")
        ax.axhline(summaries[kind]["target_test_acc"], color="gray", linestyle=":",
                   label="baseline's final accuracy")
        ax.set(title=f"{kind.upper()}: test accuracy by learning rate", xlabel="training steps",
               ylabel="test accuracy", ylim=(0, 1))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and one seed")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_digits(device)
    seeds = [0] if args.quick else [0, 1, 2]
    # Baseline learning rates: what trains the networks without BN within the step budget.
    settings = dict(mlp=dict(base_lr=1.0, steps=600 if args.quick else 3000, eval_every=25 if args.quick else 50),
                    cnn=dict(base_lr=0.02, steps=300 if args.quick else 1500, eval_every=25 if args.quick else 50))
    configs = [(False, 1), (True, 1), (True, 5), (True, 30), (False, 5)]
    runs, summaries = [], {}
    t0 = time.perf_counter()
    for kind in ("mlp", "cnn"):
        kind_runs, summaries[kind] = experiment(kind, settings[kind]["base_lr"], settings[kind]["steps"],
                                                settings[kind]["eval_every"], seeds, data, configs)
        runs += kind_runs
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(
        setup=dict(data="sklearn.datasets.load_digits: 1297 train / 500 test (stratified, seed 0)",
                   batch=BATCH, seeds=seeds, settings=settings, device=device,
                   torch=torch.__version__, bnkernels=bnkernels.__version__, quick=args.quick,
                   seconds=round(time.perf_counter() - t0, 1)),
        summary=summaries, runs=runs)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    plot(args.out, runs, summaries)
    for kind, s in summaries.items():
        print(f"\n{kind}: baseline final test accuracy {s['target_test_acc']:.3f}")
        for e in s["configs"]:
            reach = e["steps_to_target"]
            print(f"  {'BN   ' if e['bn'] else 'no BN'} lr x{e['lr_mult']:<3} final acc "
                  f"{e['final_test_acc']['mean']:.3f} +- {e['final_test_acc']['std']:.3f}; "
                  f"reached baseline in {e['reached']}/{e['runs']} runs"
                  + (f", {reach['mean']:.0f} +- {reach['std']:.0f} steps" if reach else "")
                  + (f" ({e['steps_ratio_vs_baseline']}x fewer)" if "steps_ratio_vs_baseline" in e else "")
                  + (f"; diverged {e['diverged']}" if e["diverged"] else ""))
    print(f"\nwrote {args.out / 'results.json'} and the plots in {round(time.perf_counter() - t0)} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
