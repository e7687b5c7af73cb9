r"""Study ``modes``: mode-seeking vs mass-covering.

A restricted model Q is fitted to a fixed multimodal target P by minimising ``D(P || Q)``, once
per selected divergence and seed, in two experiments:

1. **1-D Gaussian vs a Gaussian mixture.** P is a mixture of three well-separated Gaussians; Q is
   ``N(mu, sigma^2)`` with learnable ``mu`` and ``log sigma``. Both densities are discretised on
   a fine grid (log density + log dx, renormalised with logsumexp) and the library's
   ``Divergence.from_log_probs`` supplies the objective and its gradient.
2. **Factorised categorical on a 2-D grid.** P is a mixture of three Gaussian blobs on a 24 x 24
   grid; Q is the product of two independent 24-way categoricals (row and column logits). The
   family cannot place mass on the three blobs without also placing it on the "ghost" cells where
   the row of one blob meets the column of another, so a mass-covering divergence spreads over the
   blobs *and* the ghosts, while a mode-seeking one sits on one blob.

**What a seed varies: the starting point of the fit** (the target is fixed). Seed ``s`` draws the
1-D model's initial mean uniformly between the outer modes (``GAUSS_INIT_RANGE``; initial sigma 1,
narrower than any mixture gap) and the 2-D model's initial row and column logits from
``N(0, GRID_INIT_STD^2)``; every divergence starts from the same point under the same seed, so
the comparison is paired. The spread over seeds is therefore the sensitivity of the fit to its
start: a divergence with a single basin reaches the same fit from every start (sd about 0), one with
local optima on single modes lands in whichever basin the start lies in (sd of ``gauss_mu`` of
several units). ``StudyResult.notes`` says, per divergence, what each start led to.

**Optimisation.** Every fit of every divergence and seed runs in one batched Adam loop (Adam is
elementwise, so stacking the independent fits' parameters and summing their objectives gives
exactly the separate runs). Each fit minimises ``log D(P || Q)``, which has the same minimiser as
``D`` but a gradient ``grad D / D`` that does not depend on the divergence's scale: a chi-square-like
divergence (``alpha`` with alpha = 2 is ``chi2(P || Q) / 2``) starts at ~1e16 from a narrow Gaussian,
and on ``D`` itself Adam's second-moment estimate remembers those first gradients for hundreds of
steps and the fit stalls (measured: alpha = 2 still at sigma 1.5 after 300 steps). Adam runs with
betas (0.5, 0.9) and a learning rate cosine-decayed to 0 over the steps; against 600-step fits, 150
steps agree to 0.002 in sigma, 0.005 in mu, 0.001 in coverage and 0.014 nats in the 2-D entropy for
every default divergence from 6 starts, while 120 steps left alpha = 2 from a start beside the
lightest mode still moving. The two experiments share
one ``from_log_probs`` call per divergence and step: the 2-D rows are padded to the 1-D length with
zero-probability entries (p = q = 0), which add exactly 0 to value and gradient.

**Metrics.** A mode's *region* is the interval (1-D) or disc (2-D) of ``MODE_RADIUS`` component
standard deviations around its centre. ``coverage`` is the worst mode's share
``min_k Q(region_k) / P(region_k)`` (1 for Q = P; 0 when a mode is missed), ``precision`` is
``Q(union of regions)``, the fraction of the model's mass that sits on some mode (a point mass on
one mode scores 1: it rewards collapse by construction), ``modes`` counts regions holding at least
``COVER_THRESHOLD`` of Q's mass. ``fkl``/``rkl`` are KL(P||Q) and KL(Q||P) of the fit; each is
minimised by its namesake divergence by construction, so they check the optimiser rather than rank
the divergences.

Forward KL of a Gaussian model is minimised by moment matching (the fitted mean and variance are
the mixture's), and of the factorised model by the product of the target's marginals (its value is
the mutual information of P's row and column); both are closed-form facts the tests check.
"""

from __future__ import annotations

import math

import torch

from ...math import registry
from .. import decide, plotting
from ..decide import tie_notes
from ..optim import Adam
from ..study import BuiltinStudy, Figure, StudyContext, StudyResult, divergence_label, register_study

# ----------------------------------------------------------------- settings
GAUSS_WEIGHTS = (0.5, 0.3, 0.2)
GAUSS_MEANS = (-5.0, 0.5, 5.0)
GAUSS_STD = 0.7
GAUSS_GRID = (-20.0, 20.0, 1600)  # wide enough that truncation changes the mixture's moments by < 1e-6
GAUSS_INIT_RANGE = (-5.0, 5.0)  # a seed draws the initial mu uniformly in this range (between the outer modes)
GAUSS_INIT_SIGMA = 1.0  # initial sigma: narrower than the gaps between modes
GAUSS_LR = 0.2

GRID_SIZE = 24
BLOB_CENTRES = ((4.0, 5.0), (11.0, 19.0), (19.0, 12.0))  # (row, column): distinct rows and columns
BLOB_WEIGHTS = (0.45, 0.33, 0.22)
BLOB_STD = 1.5
GRID_LR = 0.3
GRID_INIT_STD = 1.0  # a seed draws the initial row and column logits from N(0, GRID_INIT_STD^2)

MODE_RADIUS = 2.0  # a mode's region: within MODE_RADIUS component stds of its centre
COVER_THRESHOLD = 0.01  # a mode counts as covered when its region holds >= 1% of the model's mass
RESOLUTION = 0.01  # coverage / precision differences of at most 1% of the mass are ties

ADAM_BETAS = (0.5, 0.9)  # short memories (with the default betas the fits need several hundred steps)
DTYPE = torch.float64

#: Per-seed metrics of one fit (prefix gauss_ = 1-D experiment, grid_ = 2-D experiment).
GAUSS_METRICS = ("gauss_sigma", "gauss_mu", "gauss_modes", "gauss_coverage", "gauss_precision", "gauss_fkl", "gauss_rkl")
GRID_METRICS = ("grid_entropy", "grid_modes", "grid_coverage", "grid_precision", "grid_fkl", "grid_rkl")
#: The two recommendation metrics: the mean of the 1-D and 2-D values of coverage and precision.
SUMMARY_METRICS = ("coverage", "precision")
METRICS = (*GAUSS_METRICS, *GRID_METRICS, *SUMMARY_METRICS)
COLUMNS = ["character", *GAUSS_METRICS, *GRID_METRICS]

GOALS = {
    "coverage": "cover every mode of a multimodal target (mass-covering)",
    "precision": "concentrate on one mode (mode-seeking / precision)",
}


def _cosine(steps: int):
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))


def _entropy(log_q: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of normalised log-probabilities along the last dimension."""
    q = log_q.exp()
    return -(torch.where(q > 0, q * log_q, torch.zeros_like(q))).sum(-1)


def _normalise(log_mass: torch.Tensor) -> torch.Tensor:
    return log_mass - torch.logsumexp(log_mass, dim=-1, keepdim=True)


def _region_metrics(q: torch.Tensor, p_regions: torch.Tensor, regions: torch.Tensor) -> dict:
    """``q``: [..., L] probabilities; ``regions``: [K, L] bool masks; ``p_regions``: [K] target masses.
    Returns tensors [...]: modes (count >= threshold), coverage (worst Q/P share), precision (mass on regions)."""
    masses = q @ regions.to(q.dtype).T  # [..., K]
    return {
        "modes": (masses >= COVER_THRESHOLD).sum(-1).to(q.dtype),
        "coverage": (masses / p_regions).min(-1).values,
        "precision": q @ regions.any(0).to(q.dtype),
    }


# --------------------------------------------------- experiment 1: 1-D Gaussian
class _GaussianTask:
    def __init__(self, device: torch.device):
        lo, hi, n = GAUSS_GRID
        self.x = torch.linspace(lo, hi, n, dtype=DTYPE, device=device)
        self.dx = (hi - lo) / (n - 1)
        w = torch.tensor(GAUSS_WEIGHTS, dtype=DTYPE, device=device)
        m = torch.tensor(GAUSS_MEANS, dtype=DTYPE, device=device)
        s = GAUSS_STD
        comp = w.log()[:, None] - 0.5 * ((self.x[None] - m[:, None]) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))
        self.log_density = torch.logsumexp(comp, dim=0)
        self.log_p = _normalise(self.log_density + math.log(self.dx))  # [L]
        self.mean = float((w * m).sum())
        self.var = float((w * (s * s + m * m)).sum()) - self.mean**2
        self.regions = torch.stack([(self.x - mu).abs() <= MODE_RADIUS * s for mu in GAUSS_MEANS])  # [3, L]
        self.p_regions = self.log_p.exp() @ self.regions.to(DTYPE).T

    def log_q(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """[...] parameters -> [..., L] normalised log-probabilities on the grid."""
        return _normalise(-0.5 * ((self.x - mu[..., None]) / log_sigma.exp()[..., None]) ** 2)

    def metrics(self, log_q: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> dict:
        """Per-fit metric tensors of shape ``log_q.shape[:-1]``."""
        log_p = self.log_p.expand_as(log_q)
        region = _region_metrics(log_q.exp(), self.p_regions, self.regions)
        return {
            "gauss_sigma": sigma,
            "gauss_mu": mu,
            "gauss_modes": region["modes"],
            "gauss_coverage": region["coverage"],
            "gauss_precision": region["precision"],
            "gauss_fkl": registry.get("forward_kl").from_log_probs(log_p, log_q),
            "gauss_rkl": registry.get("reverse_kl").from_log_probs(log_p, log_q),
        }

    def target_row(self) -> dict:
        row = self.metrics(self.log_p[None], torch.tensor([self.mean]), torch.tensor([math.sqrt(self.var)]))
        return {k: float(v[0]) for k, v in row.items()}


# ------------------------------------------- experiment 2: factorised 2-D grid
class _GridTask:
    def __init__(self, device: torch.device):
        n = GRID_SIZE
        idx = torch.arange(n, dtype=DTYPE, device=device)
        rows, cols = torch.meshgrid(idx, idx, indexing="ij")
        w = torch.tensor(BLOB_WEIGHTS, dtype=DTYPE, device=device)
        log_mass = torch.stack(
            [w[k].log() - 0.5 * ((rows - r) ** 2 + (cols - c) ** 2) / BLOB_STD**2 for k, (r, c) in enumerate(BLOB_CENTRES)]
        )
        self.log_p = _normalise(torch.logsumexp(log_mass, dim=0).reshape(-1))  # [n*n]
        self.regions = torch.stack(
            [(((rows - r) ** 2 + (cols - c) ** 2) <= (MODE_RADIUS * BLOB_STD) ** 2).reshape(-1) for r, c in BLOB_CENTRES]
        )
        self.p_regions = self.log_p.exp() @ self.regions.to(DTYPE).T

    @staticmethod
    def log_q(logits: torch.Tensor) -> torch.Tensor:
        """[..., 2, n] row and column logits -> [..., n*n] log-probabilities of the product model."""
        log_marginals = torch.log_softmax(logits, dim=-1)
        joint = log_marginals[..., 0, :, None] + log_marginals[..., 1, None, :]
        return joint.reshape(*logits.shape[:-2], GRID_SIZE * GRID_SIZE)

    def metrics(self, log_q: torch.Tensor) -> dict:
        log_p = self.log_p.expand_as(log_q)
        region = _region_metrics(log_q.exp(), self.p_regions, self.regions)
        return {
            "grid_entropy": _entropy(log_q),
            "grid_modes": region["modes"],
            "grid_coverage": region["coverage"],
            "grid_precision": region["precision"],
            "grid_fkl": registry.get("forward_kl").from_log_probs(log_p, log_q),
            "grid_rkl": registry.get("reverse_kl").from_log_probs(log_p, log_q),
        }

    def target_row(self) -> dict:
        return {k: float(v[0]) for k, v in self.metrics(self.log_p[None]).items()}


# ------------------------------------------------------------- the batched fit
def initial_points(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each seed's starting point: (initial 1-D means [S], initial 2-D logits [S, 2, GRID_SIZE])."""
    lo, hi = GAUSS_INIT_RANGE
    mus, logits = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        mus.append(lo + (hi - lo) * torch.rand((), generator=generator, dtype=DTYPE))
        logits.append(GRID_INIT_STD * torch.randn(2, GRID_SIZE, generator=generator, dtype=DTYPE))
    return torch.stack(mus), torch.stack(logits)


def _pad(log_probs: torch.Tensor, width: int) -> torch.Tensor:
    """Append -inf (zero-probability) entries up to ``width``: with p = q = 0 they add exactly 0 to every
    registered divergence and its gradient (tested), so the two experiments share one call per step."""
    pad = log_probs.new_full((*log_probs.shape[:-1], width - log_probs.shape[-1]), -math.inf)
    return torch.cat([log_probs, pad], dim=-1)


def fit_all(divergences, seeds: list[int], steps: int, device: torch.device, tick=lambda: None) -> dict:
    """Fit both experiments for every divergence (``Divergence`` instances, length D) and seed (S).

    One Adam loop over stacked parameters whose objective is ``sum_{d,s} log D_d(P || Q_{d,s})`` over
    both experiments; the fits share nothing but the loop. Per step and divergence one
    ``from_log_probs`` call evaluates [2S] rows: the S 1-D fits and the S 2-D fits (padded to the
    1-D grid's length). Returns ``mu``, ``sigma`` [D, S]; ``gauss_log_q`` [D, S, L];
    ``grid_log_q`` [D, S, GRID_SIZE**2]; ``init_mu`` [S]; and the two tasks.
    """
    gauss, grid = _GaussianTask(device), _GridTask(device)
    n_div, n_seeds = len(divergences), len(seeds)
    width = gauss.x.numel()
    init_mu, init_logits = initial_points(seeds)
    mu = init_mu.to(device).repeat(n_div, 1).requires_grad_(True)
    log_sigma = torch.full((n_div, n_seeds), math.log(GAUSS_INIT_SIGMA), dtype=DTYPE, device=device, requires_grad=True)
    logits = init_logits.to(device).repeat(n_div, 1, 1, 1).requires_grad_(True)
    optimiser = Adam([mu, log_sigma, logits], [GAUSS_LR, GAUSS_LR, GRID_LR], betas=ADAM_BETAS)
    schedule = _cosine(steps)
    log_p = torch.cat([gauss.log_p.expand(n_seeds, -1), _pad(grid.log_p, width).expand(n_seeds, -1)])  # [2S, L]
    tiny = torch.finfo(DTYPE).tiny
    for step in range(steps):
        optimiser.zero_grad()
        log_q = torch.cat([gauss.log_q(mu, log_sigma), _pad(grid.log_q(logits), width)], dim=1)  # [D, 2S, L]
        # log D: the same minimiser as D, and a gradient grad D / D that does not depend on D's scale
        loss = sum(div.from_log_probs(log_p, log_q[d]).clamp_min(tiny).log().sum() for d, div in enumerate(divergences))
        loss.backward()
        optimiser.step(schedule(step))
        tick()
    with torch.no_grad():
        return {
            "mu": mu.detach(),
            "sigma": log_sigma.detach().exp(),
            "gauss_log_q": gauss.log_q(mu, log_sigma),
            "grid_log_q": grid.log_q(logits),
            "init_mu": init_mu,
            "gauss": gauss,
            "grid": grid,
        }


def per_seed_rows(fits: dict, labels: list[str], seeds: list[int]) -> list[dict]:
    """One row per (divergence, seed) with every metric in METRICS (plain floats)."""
    gauss, grid = fits["gauss"], fits["grid"]
    with torch.no_grad():
        metrics = {
            **gauss.metrics(fits["gauss_log_q"], fits["mu"], fits["sigma"]),
            **grid.metrics(fits["grid_log_q"]),
        }
    rows = []
    for d, label in enumerate(labels):
        for s, seed in enumerate(seeds):
            row = {"divergence": label, "seed": seed, **{k: float(v[d, s]) for k, v in metrics.items()}}
            row["coverage"] = 0.5 * (row["gauss_coverage"] + row["grid_coverage"])
            row["precision"] = 0.5 * (row["gauss_precision"] + row["grid_precision"])
            rows.append(row)
    return rows


# ------------------------------------------------------------------ the study
UNITS = {
    "character": "the divergence's tags (fdiv.get(name, **params).character)",
    "gauss_sigma": "1-D experiment: fitted standard deviation (the mixture's own std in the (target) row)",
    "gauss_mu": "1-D: fitted mean (the mixture mean in the (target) row); its sd over seeds shows start-dependence",
    "gauss_modes": f"1-D: mixture components whose +-{MODE_RADIUS:g} std interval holds >= {COVER_THRESHOLD:.0%} "
    "of the model's mass (of 3)",
    "gauss_coverage": "1-D: worst mode's share, min_k Q(mode k) / P(mode k); 1 = every mode gets its target mass",
    "gauss_precision": "1-D: fraction of the model's mass on the three mode intervals (1 for a point mass on a mode)",
    "gauss_fkl": "1-D: forward KL(P||Q) of the fitted model, nats (on the grid; minimised by forward_kl by construction)",
    "gauss_rkl": "1-D: reverse KL(Q||P) of the fitted model, nats (minimised by reverse_kl by construction)",
    "grid_entropy": "2-D experiment: Shannon entropy of the fitted factorised categorical, nats (uniform = log 576 = 6.36)",
    "grid_modes": f"2-D: blobs whose disc of radius {MODE_RADIUS:g} std holds >= {COVER_THRESHOLD:.0%} of the model's "
    "mass (of 3)",
    "grid_coverage": "2-D: worst blob's share, min_k Q(blob k) / P(blob k)",
    "grid_precision": "2-D: fraction of the model's mass on the three blob discs (the rest is on ghost cells or "
    "background)",
    "grid_fkl": "2-D: forward KL(P||Q) of the fitted model, nats",
    "grid_rkl": "2-D: reverse KL(Q||P) of the fitted model, nats",
}


def recommendations(rows: list[dict], study: str = "modes") -> list[dict]:
    """The two goals, decided by :func:`fdiv.lab.decide.recommend` on the per-seed rows."""
    recs = []
    for metric, caveat in (
        ("coverage", ""),
        ("precision", "a fit collapsed onto one mode scores 1, so this rewards mode collapse by construction; "
                      "read it with coverage"),
    ):
        recs.append(decide.recommend(
            goal=GOALS[metric],
            metric=f"{metric} (mean of the 1-D and 2-D fits' {metric})",
            samples=decide.samples_by(rows, metric=metric),
            higher_is_better=True,
            study=study,
            resolution=RESOLUTION,
            caveat=caveat,
        ).to_json())
    return recs


def _fit_kind(row: dict) -> str:
    """What a 1-D fit did, in words: covered every mode, or sat on (the interval of) one or two."""
    if row["gauss_modes"] >= len(GAUSS_MEANS):
        return f"covers all {len(GAUSS_MEANS)}"
    nearest = min(GAUSS_MEANS, key=lambda m: abs(m - row["gauss_mu"]))
    if row["gauss_modes"] == 1:
        return f"on the mode at {nearest:g}"
    return f"{int(row['gauss_modes'])} modes, mu {row['gauss_mu']:.1f}"


def start_notes(rows: list[dict], labels: list[str], seeds: list[int], init_mu: list[float]) -> list[str]:
    """Notes computed from the per-seed rows: which fits depend on the starting point, and the circular columns."""
    patterns: dict[tuple, list[str]] = {}
    steady = []
    for label in labels:
        mine = [next(r for r in rows if r["divergence"] == label and r["seed"] == seed) for seed in seeds]
        kinds = tuple(_fit_kind(r) for r in mine)
        mus = [r["gauss_mu"] for r in mine]
        if len(set(kinds)) == 1 and max(mus) - min(mus) < 0.1:
            steady.append(label)
        else:
            patterns.setdefault(kinds, []).append(label)
    notes = []
    if patterns and len(seeds) > 1:
        starts = ", ".join(f"{m:.2f} (seed {s})" for m, s in zip(init_mu, seeds))
        groups = "; ".join(f"{', '.join(names)}: {' / '.join(kinds)}" for kinds, names in patterns.items())
        notes.append(
            f"The seeds vary only the starting point (1-D start means {starts}), and the spread is real, not noise. "
            f"1-D fit per start: {groups}. A divergence that stays finite when Q misses a mode (reverse KL, and the "
            "bounded ones: js, tv, hellinger, the skewed KLs) has local optima on single modes, so where it ends up "
            "depends on where it starts"
            + (f"; {', '.join(steady)} reached the same fit from every start" if steady else "")
            + ". (Forward KL and alpha-divergences with alpha > 1 are convex in a Gaussian's natural parameters: "
            "one optimum, whatever the start.)"
        )
    grid_varied = [r["divergence"] for r in _aggregate(rows)
                   if r.get("grid_precision_sd", 0.0) > RESOLUTION or r.get("grid_coverage_sd", 0.0) > RESOLUTION]
    if grid_varied and len(seeds) > 1:
        notes.append(f"On the 2-D grid, {', '.join(grid_varied)} reached fits with different coverage or precision "
                     "from different starts (see the rows of grid_fits.png); a mode-seeking fit may also pick a "
                     "different blob with the same precision.")
    notes.append(
        "Circular columns: gauss_fkl/grid_fkl are minimised by forward_kl and gauss_rkl/grid_rkl by reverse_kl by "
        "construction (each divergence is its own objective); they check the optimiser and do not rank. The coverage "
        "goal uses the worst mode's share of its target mass, which no divergence optimises directly; precision is "
        "trivially maximised by any fit collapsed onto one mode, so it is a goal only if that collapse is wanted."
    )
    return notes


SD_FLOOR = 1e-6  # an sd over seeds below this is the optimiser's rounding and is shown as 0


def _aggregate(rows: list[dict]) -> list[dict]:
    """Mean rows with ``<metric>_sd`` (sd below SD_FLOOR set to 0) via :func:`fdiv.lab.decide.aggregate`."""
    aggregated = decide.aggregate(rows, keys=["divergence"], metrics=list(METRICS))
    for row in aggregated:
        for key in [k for k in row if k.endswith("_sd")]:
            if row[key] < SD_FLOOR:
                row[key] = 0.0
    return aggregated


def _best_text(rec: dict) -> str:
    names = rec["best"]
    values = rec["values"]
    shown = ", ".join(f"{n} {values[n]['mean']:.2f} ± {values[n]['sd']:.2f}" for n in names)
    return shown if len(names) == 1 else f"a tie between {shown}"


def _finding(recs: list[dict], aggregated: list[dict], seeds: int) -> str:
    coverage, precision = recs
    text = (
        f"To cover every mode: {_best_text(coverage)} (worst mode's share of its target mass, mean of the 1-D and "
        f"2-D fits). To concentrate on one mode: {_best_text(precision)} (fraction of the model's mass on a mode). "
    )
    if len(aggregated) > 1:
        widest = max(aggregated, key=lambda r: r["gauss_sigma"])
        narrowest = min(aggregated, key=lambda r: r["gauss_sigma"])
        text += (
            f"1-D sigma ranges from {narrowest['gauss_sigma']:.2f} ({narrowest['divergence']}) to "
            f"{widest['gauss_sigma']:.2f} ({widest['divergence']}); "
        )
    text += f"mean ± sd over {seeds} starting point{'s' if seeds != 1 else ''}."
    return text


def _short(rec: dict) -> str:
    return " = ".join(rec["best"])


def _plot_gaussians(path, fits, labels, aggregated, seeds, title) -> None:
    gauss = fits["gauss"]
    ncols = min(4, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    fig, axes = plotting.plt.subplots(nrows, ncols, figsize=(3.1 * ncols, 2.4 * nrows + 0.7), squeeze=False,
                                      sharex=True, sharey=True)
    shown = ((gauss.x >= -10) & (gauss.x <= 10)).nonzero().reshape(-1)[::2]  # dx 0.05 is plenty for a figure
    x = gauss.x[shown].cpu().numpy()
    target = gauss.log_density[shown].exp().cpu().numpy()
    densities = (fits["gauss_log_q"][..., shown] - math.log(gauss.dx)).exp().cpu().numpy()
    styles = ["-", "--", ":", "-."]
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    for d, (ax, label, row) in enumerate(zip(axes.flat, labels, aggregated)):
        ax.fill_between(x, target, color=plotting.NEUTRAL, alpha=0.25, linewidth=0)
        for s in range(len(seeds)):
            ax.plot(x, densities[d, s], color=plotting.colour_for(label), linestyle=styles[s % len(styles)],
                    linewidth=1.4, label=f"seed {seeds[s]}")
            ax.plot(float(fits["init_mu"][s]), 0.0, marker="|", markersize=8, color=plotting.NEUTRAL)
        sd = row.get("gauss_sigma_sd", 0.0)
        ax.set_title(f"{label}\nsigma {row['gauss_sigma']:.2f} ± {sd:.2f}, coverage {row['gauss_coverage']:.2f}",
                     fontsize=8.5, color=plotting.colour_for(label))
        ax.set_xlim(-10, 10)
        ax.set_ylim(0, 0.65)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("x", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("density", fontsize=8)
    if len(seeds) > 1:
        axes.flat[0].legend(fontsize=6.5, frameon=False, loc="upper right", handlelength=2.2)
    plotting.save(fig, path, title)


def _plot_grids(path, fits, labels, aggregated, target_row, seeds, title) -> None:
    grid = fits["grid"]
    grids = fits["grid_log_q"].exp().reshape(len(labels), len(seeds), GRID_SIZE, GRID_SIZE).cpu().numpy()
    ncols, nrows = len(labels) + 1, len(seeds)
    fig, axes = plotting.plt.subplots(nrows, ncols, figsize=(1.45 * ncols, 1.3 * nrows + 0.9), squeeze=False)
    target = grid.log_p.exp().reshape(GRID_SIZE, GRID_SIZE).cpu().numpy()
    panels = {(0, 0): ("target P", target, target_row, "black")}
    for s in range(nrows):
        for d, label in enumerate(labels):
            panels[(s, d + 1)] = (label if s == 0 else "", grids[d, s], None, plotting.colour_for(label))
    for (s, c), ax in zip(((s, c) for s in range(nrows) for c in range(ncols)), axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if (s, c) not in panels:
            ax.axis("off")
            continue
        name, image, _, colour = panels[(s, c)]
        ax.imshow(image, cmap="viridis", origin="upper", interpolation="nearest")
        for r, cc in BLOB_CENTRES:
            ax.add_patch(plotting.plt.Circle((cc, r), MODE_RADIUS * BLOB_STD, fill=False, color="white", lw=0.6, ls=":"))
        if name:
            ax.set_title(name, fontsize=7.5, color=colour)
        if c == 1:
            ax.set_ylabel(f"seed {seeds[s]}", fontsize=7.5)
    plotting.save(fig, path, title)


def _plot_bars(path, labels, rows, aggregated, target_row, title) -> None:
    """Mean over seeds as bars, each seed's value as a dot (with 3 seeds the dots say more than an sd)."""
    fig, axes = plotting.plt.subplots(2, 2, figsize=(9.0, 6.2), squeeze=False, sharey="row")
    colours = [plotting.colour_for(label) for label in labels]
    for row_index, metric in enumerate(("coverage", "precision")):
        for col_index, (prefix, name) in enumerate((("gauss", "1-D Gaussian fit"), ("grid", "2-D factorised fit"))):
            ax = axes[row_index][col_index]
            key = f"{prefix}_{metric}"
            ax.bar(range(len(labels)), [r[key] for r in aggregated], color=colours, width=0.7)
            for i, label in enumerate(labels):
                values = [r[key] for r in rows if r["divergence"] == label]
                offsets = [0.18 * (j - (len(values) - 1) / 2) for j in range(len(values))]
                ax.plot([i + o for o in offsets], values, linestyle="", marker="o", markersize=3.5,
                        markerfacecolor="white", markeredgecolor="black", markeredgewidth=0.8,
                        label="each seed" if i == 0 else None)
            ax.axhline(target_row[key], color=plotting.NEUTRAL, linestyle="--", linewidth=1.0, label="target P itself")
            ax.set_ylim(0, 1.1)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels if row_index == 1 else [], rotation=40, ha="right", fontsize=8)
            ax.set_title(f"{name}: {metric}", fontsize=9.5)
            if (row_index, col_index) == (0, 1):  # one legend, where the bars are low (2-D coverage)
                ax.legend(fontsize=8, frameon=False, loc="center right")
            if col_index == 0:
                ax.set_ylabel("worst mode's share of its\ntarget mass" if metric == "coverage"
                              else "fraction of model mass\non a mode", fontsize=8.5)
    plotting.save(fig, path, title)


@register_study
class ModesStudy(BuiltinStudy):
    name = "modes"  # title, description and defaults: fdiv.lab.catalog (torch-free, read by --list)

    def execute(self, ctx: StudyContext, steps: int, out) -> StudyResult:
        seeds = list(ctx.seeds)
        labels = [divergence_label(n, p) for n, p in ctx.divergences]
        divergences = [registry.get(n, **p) for n, p in ctx.divergences]
        tick = ctx.ticker(steps, every=max(1, steps // 8),
                          unit=f"Adam steps (each updates all {len(labels)} divergences x {len(seeds)} seeds x 2 fits)")
        fits = fit_all(divergences, seeds, steps, ctx.device, tick)
        rows = per_seed_rows(fits, labels, seeds)
        aggregated = _aggregate(rows)
        for row, div in zip(aggregated, divergences):
            row["character"] = ", ".join(div.character)
        target_row = {"divergence": "(target)", "character": "", **fits["gauss"].target_row(),
                      **fits["grid"].target_row()}
        target_row["gauss_mu"], target_row["gauss_sigma"] = fits["gauss"].mean, math.sqrt(fits["gauss"].var)
        recs = recommendations(rows, self.name)
        finding = _finding(recs, aggregated, len(seeds))
        notes = start_notes(rows, labels, seeds, [float(m) for m in fits["init_mu"]]) + tie_notes(recs)

        cover, precise = recs
        _plot_gaussians(out / "gaussian_fits.png", fits, labels, aggregated, seeds,
                        f"1-D: Gaussian fits from {len(seeds)} starting points (ticks); widest: "
                        f"{max(aggregated, key=lambda r: r['gauss_sigma'])['divergence']}")
        _plot_grids(out / "grid_fits.png", fits, labels, aggregated, target_row, seeds,
                    "2-D: factorised fits per seed (rows); dotted: the blob discs")
        _plot_bars(out / "coverage_precision.png", labels, rows, aggregated, target_row,
                   f"Cover every mode: {_short(cover)}; concentrate on one: {_short(precise)}")
        figures = [
            Figure(
                f"{self.name}/gaussian_fits.png",
                "1-D: Gaussian fits to a three-component mixture, one panel per divergence",
                f"Grey: the target mixture P (weights {'/'.join(f'{w:g}' for w in GAUSS_WEIGHTS)} at "
                f"{', '.join(f'{m:g}' for m in GAUSS_MEANS)}, std {GAUSS_STD:g}). Each line is the Gaussian Q that "
                "minimises D(P || Q) from one seed's starting mean (tick on the x axis; line style = seed). A curve "
                "sitting on one bump is mode-seeking; a wide curve spanning all bumps is mass-covering; lines that "
                "coincide mean the fit does not depend on the start. At its optimum forward KL matches the mixture's "
                "mean and variance.",
            ),
            Figure(
                f"{self.name}/grid_fits.png",
                "2-D: factorised categorical fits to three blobs, per seed",
                "Top left: the target P, three Gaussian blobs on a 24x24 grid (dotted circles: the blob discs used for "
                "the modes, coverage and precision columns). Each other panel is the fitted product-of-marginals "
                "model Q for one divergence (column) from one seed's starting logits (row), each on its own colour "
                "scale. A model that cannot represent the three blobs either spreads over them plus the 'ghost' cells "
                "where one blob's row meets another's column (mass-covering) or sits on a single blob (mode-seeking); "
                "a mode-seeking fit may pick a different blob from a different start.",
            ),
            Figure(
                f"{self.name}/coverage_precision.png",
                "Coverage and precision of the fitted model per divergence",
                "Top: the worst mode's share of its target mass, min_k Q(mode k) / P(mode k) (0 = a mode is missed). "
                "Bottom: the fraction of the model's mass on some mode. Bars: mean over seeds; dots: each seed (a "
                "different starting point); dashed: the target P itself. Mass-covering fits score high on top and low "
                "at the bottom, mode-seeking fits the reverse.",
            ),
        ]
        ctx.progress(steps, steps, "Adam steps")
        table = [target_row, *aggregated]
        columns = [c for c in COLUMNS if len({repr(row.get(c)) for row in table}) > 1]
        constant = {c: table[0].get(c) for c in COLUMNS if c not in columns}  # equal in every row: config, not table
        return StudyResult(
            name=self.name,
            title=self.title,
            finding=finding,
            columns=columns,
            rows=table,
            figures=figures,
            config={
                "steps": steps,
                "seeds": seeds,
                "seed_varies": "the starting point of every fit (1-D initial mean, 2-D initial logits); the target "
                "is fixed and every divergence starts from the same point under the same seed",
                "objective": "Adam on log D(P || Q) (same minimiser as D; scale-free gradient), all fits batched",
                "optimiser": f"Adam, betas {ADAM_BETAS}, learning rate cosine-decayed to 0 over the steps",
                "gaussian": {
                    "lr": GAUSS_LR,
                    "weights": list(GAUSS_WEIGHTS),
                    "means": list(GAUSS_MEANS),
                    "std": GAUSS_STD,
                    "grid": {"lo": GAUSS_GRID[0], "hi": GAUSS_GRID[1], "points": GAUSS_GRID[2]},
                    "init_mu": f"Uniform{GAUSS_INIT_RANGE} from the seed",
                    "init_mu_drawn": [round(float(v), 4) for v in fits["init_mu"]],
                    "init_sigma": GAUSS_INIT_SIGMA,
                    "mixture_mean": fits["gauss"].mean,
                    "mixture_std": math.sqrt(fits["gauss"].var),
                },
                "grid": {
                    "lr": GRID_LR,
                    "size": GRID_SIZE,
                    "blob_centres_row_col": [list(c) for c in BLOB_CENTRES],
                    "blob_weights": list(BLOB_WEIGHTS),
                    "blob_std": BLOB_STD,
                    "init_logits": f"{GRID_INIT_STD:g} * N(0,1) from the seed",
                },
                "mode_radius_std": MODE_RADIUS,
                "cover_threshold": COVER_THRESHOLD,
                "resolution": RESOLUTION,
                "constant_columns": constant,
                "divergences": labels,
                "device": str(ctx.device),
                "per_seed_rows": rows,
            },
            units=dict(UNITS),
            recommendations=recs,
            notes=notes,
            seeds=seeds,
        )
