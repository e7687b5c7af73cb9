"""Study ``modes``: mode-seeking vs mass-covering.

A restricted model Q is fitted to a fixed multimodal target P by minimising
``D(P || Q)`` with Adam, once per selected divergence, in two settings:

1. **1-D Gaussian vs a Gaussian mixture.** P is a mixture of three
   well-separated Gaussians; Q is ``N(mu, sigma^2)`` with learnable ``mu`` and
   ``log sigma``. Both densities are discretised on a fine grid (log density +
   log dx, renormalised with logsumexp) and the library's
   ``Divergence.from_log_probs`` supplies the objective and its gradient.
2. **Factorised categorical on a 2-D grid.** P is a mixture of three Gaussian
   blobs on a 24 x 24 grid; Q is the product of two independent 24-way
   categoricals (row and column logits). The family cannot place mass on the
   three blobs without also placing it on the "ghost" cells where the row of
   one blob meets the column of another, so a mass-covering divergence spreads
   over the blobs *and* the ghosts, while a mode-seeking one sits on one blob.

Every fit starts from the same point. The 1-D model starts narrow (sigma 1) and
off-centre, 0.4 mixture stds from the mixture mean towards the heaviest mode:
reverse KL then reaches its global optimum (the heaviest component, value
-log 0.5), while from a wide start it can stall in a broad local optimum over
two components; a mass-covering divergence widens from there regardless. Adam
runs with betas (0.5, 0.9) and a cosine-decayed learning rate, which converges in
~80 steps (the default betas remember the large early gradients for hundreds).

Forward KL of a Gaussian model is minimised by moment matching (the fitted mean
and variance are the mixture's), and of the factorised model by the product of
the target's marginals; both are closed-form facts the tests check.
"""

from __future__ import annotations

import math

import torch

from ...math import registry
from .. import plotting
from ..study import BuiltinStudy, Figure, StudyContext, StudyResult, divergence_label, register_study

# ----------------------------------------------------------------- settings
GAUSS_WEIGHTS = (0.5, 0.3, 0.2)
GAUSS_MEANS = (-5.0, 0.5, 5.0)
GAUSS_STD = 0.7
GAUSS_GRID = (-20.0, 20.0, 1600)  # wide enough that truncation changes the mixture's moments by < 1e-6
GAUSS_INIT_SHIFT = -0.4  # initial mu = mixture mean + shift * mixture std: off-centre, towards the heaviest mode
GAUSS_INIT_SIGMA = 1.0  # initial sigma (the model starts narrow and off-centre)
GAUSS_LR = 0.2

GRID_SIZE = 24
BLOB_CENTRES = ((4.0, 5.0), (11.0, 19.0), (19.0, 12.0))  # (row, column): distinct rows and columns
BLOB_WEIGHTS = (0.45, 0.33, 0.22)
BLOB_STD = 1.5
GRID_LR = 0.3
GRID_INIT_NOISE = 0.01  # std of the seeded perturbation of the uniform initial logits

MODE_RADIUS = 2.0  # a mode's region: within MODE_RADIUS component stds of its centre
COVER_THRESHOLD = 0.01  # a mode counts as covered when its region holds >= 1% of the model's mass

ADAM_BETAS = (0.5, 0.9)  # short memories: converges in ~80 steps (the default betas need several hundred)
DTYPE = torch.float64


def _cosine(steps: int):
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))


def _adam_fit(objective, parameters, steps: int, lr: float, tick) -> float:
    """Minimise ``objective()`` with Adam and a cosine-decayed learning rate; return the final value."""
    optimiser = torch.optim.Adam(parameters, lr=lr, betas=ADAM_BETAS)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _cosine(steps))
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        optimiser.step()
        schedule.step()
        tick()
    with torch.no_grad():
        return float(objective())


def _entropy(log_q: torch.Tensor) -> float:
    """Shannon entropy (nats) of a normalised log-probability vector."""
    q = log_q.exp()
    return float(-(torch.where(q > 0, q * log_q, torch.zeros_like(q))).sum())


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
        self.log_p = self._normalise(self.log_density + math.log(self.dx))
        self.mean = float((w * m).sum())
        self.var = float((w * (s * s + m * m)).sum()) - self.mean**2
        self.regions = [(mu - MODE_RADIUS * s, mu + MODE_RADIUS * s) for mu in GAUSS_MEANS]

    @staticmethod
    def _normalise(log_mass: torch.Tensor) -> torch.Tensor:
        return (log_mass - torch.logsumexp(log_mass, dim=-1, keepdim=True)).reshape(1, -1)

    def log_q(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        return self._normalise(-0.5 * ((self.x - mu) / log_sigma.exp()) ** 2)

    def modes_covered(self, log_mass: torch.Tensor) -> int:
        q = log_mass.exp().reshape(-1)
        return sum(int(float(q[(self.x >= a) & (self.x <= b)].sum()) >= COVER_THRESHOLD) for a, b in self.regions)

    def target_row(self) -> dict:
        return {
            "gauss_entropy": _entropy(self.log_p) + math.log(self.dx),  # differential entropy of the mixture
            "gauss_fkl": 0.0,
            "gauss_rkl": 0.0,
            "gauss_mu": self.mean,
            "gauss_sigma": math.sqrt(self.var),
            "gauss_modes": self.modes_covered(self.log_p),
        }

    def fit(self, div, steps: int, generator: torch.Generator, tick) -> tuple[dict, torch.Tensor]:
        jitter = 0.01 * float(torch.randn((), generator=generator, dtype=DTYPE))
        mu0 = self.mean + (GAUSS_INIT_SHIFT + jitter) * math.sqrt(self.var)
        mu = torch.tensor(mu0, dtype=DTYPE, device=self.x.device, requires_grad=True)
        log_sigma = torch.tensor(math.log(GAUSS_INIT_SIGMA), dtype=DTYPE, device=self.x.device, requires_grad=True)
        objective = lambda: div.from_log_probs(self.log_p, self.log_q(mu, log_sigma)).sum()  # noqa: E731
        _adam_fit(objective, [mu, log_sigma], steps, GAUSS_LR, tick)
        with torch.no_grad():
            log_q = self.log_q(mu, log_sigma)
            sigma = float(log_sigma.exp())
            row = {
                "gauss_entropy": 0.5 * math.log(2 * math.pi * math.e * sigma**2),
                "gauss_fkl": float(registry.get("forward_kl").from_log_probs(self.log_p, log_q).sum()),
                "gauss_rkl": float(registry.get("reverse_kl").from_log_probs(self.log_p, log_q).sum()),
                "gauss_mu": float(mu),
                "gauss_sigma": sigma,
                "gauss_modes": self.modes_covered(log_q),
            }
        return row, (log_q.reshape(-1) - math.log(self.dx)).exp()  # fitted density on the grid


# ------------------------------------------- experiment 2: factorised 2-D grid
class _GridTask:
    def __init__(self, device: torch.device):
        n = GRID_SIZE
        idx = torch.arange(n, dtype=DTYPE, device=device)
        rows, cols = torch.meshgrid(idx, idx, indexing="ij")
        w = torch.tensor(BLOB_WEIGHTS, dtype=DTYPE, device=device)
        log_mass = torch.stack(
            [
                w[k].log() - 0.5 * ((rows - r) ** 2 + (cols - c) ** 2) / BLOB_STD**2
                for k, (r, c) in enumerate(BLOB_CENTRES)
            ]
        )
        log_mass = torch.logsumexp(log_mass, dim=0).reshape(1, -1)
        self.log_p = log_mass - torch.logsumexp(log_mass, dim=-1, keepdim=True)
        self.regions = [
            (((rows - r) ** 2 + (cols - c) ** 2) <= (MODE_RADIUS * BLOB_STD) ** 2).reshape(-1)
            for r, c in BLOB_CENTRES
        ]
        self.device = device

    @staticmethod
    def log_q(row_logits: torch.Tensor, col_logits: torch.Tensor) -> torch.Tensor:
        log_rows = torch.log_softmax(row_logits, dim=-1)
        log_cols = torch.log_softmax(col_logits, dim=-1)
        return (log_rows[:, None] + log_cols[None, :]).reshape(1, -1)

    def mode_masses(self, log_q: torch.Tensor) -> list[float]:
        q = log_q.exp().reshape(-1)
        return [float(q[region].sum()) for region in self.regions]

    def metrics(self, log_q: torch.Tensor) -> dict:
        masses = self.mode_masses(log_q)
        return {
            "grid_entropy": _entropy(log_q),
            "grid_fkl": float(registry.get("forward_kl").from_log_probs(self.log_p, log_q).sum()),
            "grid_rkl": float(registry.get("reverse_kl").from_log_probs(self.log_p, log_q).sum()),
            "mass_on_modes": sum(masses),
            "modes_covered": sum(int(m >= COVER_THRESHOLD) for m in masses),
        }

    def fit(self, div, steps: int, generator: torch.Generator, tick) -> tuple[dict, torch.Tensor]:
        init = GRID_INIT_NOISE * torch.randn(2, GRID_SIZE, generator=generator, dtype=DTYPE)
        row_logits = init[0].clone().to(self.device).requires_grad_(True)
        col_logits = init[1].clone().to(self.device).requires_grad_(True)
        objective = lambda: div.from_log_probs(self.log_p, self.log_q(row_logits, col_logits)).sum()  # noqa: E731
        _adam_fit(objective, [row_logits, col_logits], steps, GRID_LR, tick)
        with torch.no_grad():
            log_q = self.log_q(row_logits, col_logits)
            return self.metrics(log_q), log_q.exp().reshape(GRID_SIZE, GRID_SIZE)


# ------------------------------------------------------------------ the study
COLUMNS = [
    "gauss_entropy",
    "gauss_sigma",
    "gauss_mu",
    "gauss_modes",
    "gauss_fkl",
    "gauss_rkl",
    "grid_entropy",
    "modes_covered",
    "mass_on_modes",
    "grid_fkl",
    "grid_rkl",
]

UNITS = {
    "gauss_entropy": "1-D experiment: differential entropy of the fitted Gaussian, 0.5*log(2*pi*e*sigma^2), nats",
    "gauss_sigma": "1-D: fitted standard deviation (the target mixture's own std in the (target) row)",
    "gauss_mu": "1-D: fitted mean (the mixture mean in the (target) row)",
    "gauss_modes": f"1-D: mixture components whose +-{MODE_RADIUS:g} std interval holds >= {COVER_THRESHOLD:.0%} of the model's mass (of 3)",
    "gauss_fkl": "1-D: forward KL(P||Q) of the fitted model, nats (on the grid)",
    "gauss_rkl": "1-D: reverse KL(Q||P) of the fitted model, nats (on the grid)",
    "grid_entropy": "2-D experiment: Shannon entropy of the fitted factorised categorical, nats (uniform = log 576 = 6.36)",
    "modes_covered": f"2-D: blobs whose disc of radius {MODE_RADIUS:g} std holds >= {COVER_THRESHOLD:.0%} of the model's mass (of 3)",
    "mass_on_modes": "2-D: fraction of the model's mass on the three blob discs (the rest is on ghost cells or background)",
    "grid_fkl": "2-D: forward KL(P||Q) of the fitted model, nats",
    "grid_rkl": "2-D: reverse KL(Q||P) of the fitted model, nats",
}


def _extremes(rows: list[dict], key: str) -> tuple[dict, dict]:
    ordered = sorted(rows, key=lambda r: r[key])
    return ordered[0], ordered[-1]


def _finding(rows: list[dict], target: dict) -> tuple[str, str, str]:
    """(full finding, short title for the 1-D figure, short title for the 2-D figure)."""
    if len(rows) == 1:
        r = rows[0]
        text = (
            f"Only {r['divergence']} was run: on the 1-D mixture its Gaussian has entropy {r['gauss_entropy']:.2f} nats "
            f"(sigma {r['gauss_sigma']:.2f}, {r['gauss_modes']} of 3 modes; target {target['gauss_entropy']:.2f} nats); "
            f"on the 2-D grid its fit has entropy {r['grid_entropy']:.2f} nats and covers {r['modes_covered']} of 3 blobs."
        )
        return (
            text,
            f"{r['divergence']}: sigma {r['gauss_sigma']:.2f}, {r['gauss_modes']} of 3 modes",
            f"{r['divergence']}: {r['modes_covered']} of 3 blobs covered",
        )
    g_lo, g_hi = _extremes(rows, "gauss_entropy")
    q_lo, q_hi = _extremes(rows, "grid_entropy")
    text = (
        f"On the 1-D mixture, {g_lo['divergence']} fits the narrowest Gaussian (entropy {g_lo['gauss_entropy']:.2f} nats, "
        f"sigma {g_lo['gauss_sigma']:.2f}, {g_lo['gauss_modes']} of 3 modes) and {g_hi['divergence']} the widest "
        f"({g_hi['gauss_entropy']:.2f} nats, sigma {g_hi['gauss_sigma']:.2f}, {g_hi['gauss_modes']} of 3 modes; "
        f"the target has {target['gauss_entropy']:.2f} nats). "
        f"On the 2-D grid, {q_lo['divergence']} concentrates most ({q_lo['grid_entropy']:.2f} nats, "
        f"{q_lo['modes_covered']} of 3 blobs, {q_lo['mass_on_modes']:.0%} of its mass on the blobs) and "
        f"{q_hi['divergence']} spreads most ({q_hi['grid_entropy']:.2f} nats, {q_hi['modes_covered']} of 3 blobs, "
        f"{q_hi['mass_on_modes']:.0%} on the blobs)."
    )
    gauss_title = (
        f"{g_lo['divergence']} fits narrowest (sigma {g_lo['gauss_sigma']:.2f}, {g_lo['gauss_modes']}/3 modes); "
        f"{g_hi['divergence']} widest (sigma {g_hi['gauss_sigma']:.2f}, {g_hi['gauss_modes']}/3)"
    )
    grid_title = (
        f"{q_lo['divergence']} concentrates ({q_lo['grid_entropy']:.2f} nats, {q_lo['modes_covered']}/3 blobs); "
        f"{q_hi['divergence']} spreads ({q_hi['grid_entropy']:.2f} nats, {q_hi['modes_covered']}/3 blobs)"
    )
    return text, gauss_title, grid_title


def _plot_gaussians(path, task: _GaussianTask, labels, densities, rows, title) -> None:
    fig, ax = plotting.new_figure(8.0, 4.6)
    x = task.x.cpu().numpy()
    target = task.log_density.exp().cpu().numpy()
    ax.fill_between(x, target, color="0.8", label="target P (mixture)")
    ax.plot(x, target, color="0.35", linewidth=1.0)
    for i, (label, density, row) in enumerate(zip(labels, densities, rows)):
        linestyle = "-" if i < len(plotting.PALETTE) else "--"
        ax.plot(
            x, density.cpu().numpy(), color=plotting.colour(i), linestyle=linestyle, linewidth=1.6,
            label=f"{label} (sigma {row['gauss_sigma']:.2f})",
        )
    ax.set_xlim(-11, 11)
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.legend(fontsize=8, loc="upper right", frameon=False)
    plotting.save(fig, path, title)


def _plot_grids(path, task: _GridTask, labels, grids, rows, target_row, title) -> None:
    panels = [("target P", task.log_p.exp().reshape(GRID_SIZE, GRID_SIZE), target_row)]
    panels += list(zip(labels, grids, rows))
    ncols = min(5, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plotting.plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.8 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (label, grid, row) in zip(axes.flat, panels):
        ax.imshow(grid.cpu().numpy(), cmap="viridis", origin="upper", interpolation="nearest")
        for r, c in BLOB_CENTRES:
            ax.add_patch(plotting.plt.Circle((c, r), MODE_RADIUS * BLOB_STD, fill=False, color="white", lw=0.8, ls=":"))
        ax.set_title(f"{label}\nH={row['grid_entropy']:.2f}, {row['modes_covered']}/3 blobs", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    plotting.save(fig, path, title)


def _plot_entropy(path, labels, rows, target_row) -> None:
    fig, axes = plotting.new_figure(9.0, 4.2, ncols=2)
    for ax, key, name in ((axes[0], "gauss_entropy", "1-D Gaussian fit"), (axes[1], "grid_entropy", "2-D factorised fit")):
        values = [row[key] for row in rows]
        ax.bar(range(len(values)), values, color=[plotting.colour(i) for i in range(len(values))])
        ax.axhline(target_row[key], color="0.3", linestyle="--", linewidth=1.0, label=f"target {target_row[key]:.2f}")
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("entropy of fitted Q (nats)")
        ax.set_xlabel("divergence minimised")
        ax.set_title(name, fontsize=10)
        ax.set_ylim(0, 1.25 * max(*values, target_row[key]))
        ax.legend(fontsize=8, frameon=False, loc="upper right")
    g_lo, g_hi = _extremes(rows, "gauss_entropy")
    q_lo, q_hi = _extremes(rows, "grid_entropy")
    plotting.save(
        fig,
        path,
        f"Lowest entropy: {g_lo['divergence']} (1-D), {q_lo['divergence']} (2-D); "
        f"highest: {g_hi['divergence']} (1-D), {q_hi['divergence']} (2-D)",
    )


@register_study
class ModesStudy(BuiltinStudy):
    name = "modes"
    title = "Mode-seeking vs mass-covering"
    description = (
        "Fit a Gaussian to a 3-component 1-D mixture and a factorised categorical to three blobs on a 24x24 grid "
        "by minimising D(P || Q) with Adam; compare the fitted models' entropy, modes covered, forward and reverse KL."
    )
    default_steps = 300
    default_divergences = (
        "forward_kl", "reverse_kl", "js", "tv", "hellinger", "alpha", "skew_forward_kl", "skew_reverse_kl",
    )

    def execute(self, ctx: StudyContext, steps: int, out) -> StudyResult:
        gauss, grid = _GaussianTask(ctx.device), _GridTask(ctx.device)
        total = 2 * steps * len(ctx.divergences)
        tick = ctx.ticker(total, every=25)
        generator = torch.Generator().manual_seed(ctx.seed)
        target_row = {"divergence": "(target)", "character": "", **gauss.target_row(), **grid.metrics(grid.log_p)}
        rows, labels, densities, grids = [], [], [], []
        for name, params in ctx.divergences:
            div = registry.get(name, **params)
            label = divergence_label(name, params)
            g_row, density = gauss.fit(div, steps, generator, tick)
            q_row, fitted_grid = grid.fit(div, steps, generator, tick)
            rows.append({"divergence": label, "character": ", ".join(div.character), **g_row, **q_row})
            labels.append(label)
            densities.append(density)
            grids.append(fitted_grid)

        finding, gauss_title, grid_title = _finding(rows, target_row)
        _plot_gaussians(out / "gaussian_fits.png", gauss, labels, densities, rows, gauss_title)
        _plot_grids(out / "grid_fits.png", grid, labels, grids, rows, target_row, grid_title)
        _plot_entropy(out / "entropy.png", labels, rows, target_row)
        figures = [
            Figure(
                f"{self.name}/gaussian_fits.png",
                "1-D: Gaussian fits to a three-component mixture",
                f"Grey: the target mixture P (weights {'/'.join(f'{w:g}' for w in GAUSS_WEIGHTS)} at "
                f"{', '.join(f'{m:g}' for m in GAUSS_MEANS)}, std {GAUSS_STD:g}). Each line is the Gaussian Q "
                "that minimises D(P || Q) for one divergence (sigma in the legend), all started from the same point. "
                "A curve sitting on one bump is mode-seeking; a wide curve spanning all bumps (and the valleys between "
                "them) is mass-covering; at its optimum forward KL matches the mixture's mean and variance.",
            ),
            Figure(
                f"{self.name}/grid_fits.png",
                "2-D: factorised categorical fits to three blobs",
                "Top left: the target P, three Gaussian blobs on a 24x24 grid (dotted circles: the blob discs used for "
                "modes_covered and mass_on_modes). Every other panel is the fitted product-of-marginals model Q for one "
                "divergence (grid row index downwards, column index rightwards), each on its own colour scale; H is "
                "its entropy in nats. A model that cannot represent the three blobs either spreads over all of them "
                "plus the 'ghost' cells where one blob's row meets another's column (mass-covering) or sits on a "
                "single blob (mode-seeking).",
            ),
            Figure(
                f"{self.name}/entropy.png",
                "Entropy of the fitted model per divergence",
                "Bar height: the entropy of the fitted Q (left: differential entropy of the 1-D Gaussian; right: "
                "Shannon entropy of the 2-D categorical); dashed line: the target's entropy. Low bars are mode-seeking "
                "fits, high bars mass-covering ones.",
            ),
        ]
        ctx.progress(total, total)
        return StudyResult(
            name=self.name,
            title=self.title,
            finding=finding,
            columns=["character", *COLUMNS],
            rows=[target_row, *rows],
            figures=figures,
            config={
                "steps": steps,
                "seed": ctx.seed,
                "optimiser": f"Adam, betas {ADAM_BETAS}, learning rate cosine-decayed to 0 over the steps",
                "gaussian": {
                    "lr": GAUSS_LR,
                    "weights": list(GAUSS_WEIGHTS),
                    "means": list(GAUSS_MEANS),
                    "std": GAUSS_STD,
                    "grid": {"lo": GAUSS_GRID[0], "hi": GAUSS_GRID[1], "points": GAUSS_GRID[2]},
                    "init_mu": f"mixture mean + ({GAUSS_INIT_SHIFT} + 0.01*N(0,1) from seed) * mixture std",
                    "init_sigma": GAUSS_INIT_SIGMA,
                    "mixture_mean": gauss.mean,
                    "mixture_std": math.sqrt(gauss.var),
                },
                "grid": {
                    "lr": GRID_LR,
                    "size": GRID_SIZE,
                    "blob_centres_row_col": [list(c) for c in BLOB_CENTRES],
                    "blob_weights": list(BLOB_WEIGHTS),
                    "blob_std": BLOB_STD,
                    "init_logits": f"{GRID_INIT_NOISE} * N(0,1) from seed (about uniform)",
                },
                "mode_radius_std": MODE_RADIUS,
                "cover_threshold": COVER_THRESHOLD,
                "divergences": [divergence_label(n, p) for n, p in ctx.divergences],
                "device": str(ctx.device),
            },
            units={"character": "the divergence's tags (fdiv.get(name).character)", **UNITS},
        )
