r"""Study ``diffusion``: distilling a one-step generator from a diffusion teacher under each f-divergence.

**Teacher.** P is a 2-D mixture of ``MODES`` equally weighted Gaussians (std ``MODE_STD``) on a
ring of radius ``RING_RADIUS``. Under the variance-exploding forward process
``x_t = x_0 + sigma eps`` its noised density is the same mixture with variance
``MODE_STD^2 + sigma^2``, so the teacher's score at every noise level is exact in closed form
(:func:`teacher_score`; the tests check it against autograd of the mixture's log density).

**Generator.** Q is a one-step generator ``x = G_theta(z)``, ``z ~ N(0, I_2)``, a 2-64-64-2 MLP
(SiLU), distilled with :func:`fdiv.diffusion.f_distill_loss`:
``grad_theta = -E[w(sigma) h(r) (s_p(x_t) - s_q(x_t))^T dG/dtheta]`` with ``h(r) = r^2 f''(r)``
from each divergence's generator (reverse KL: ``h = 1``, VSD / DMD), the noise level drawn
log-uniformly in ``[SIGMA_MIN, SIGMA_MAX]``, ``w(sigma) = sigma^2`` (the score difference in
units of a denoiser difference) and f-distill's batch normalisation ``h / mean h``
(``weight_normalization="batch_mean"``) so that one learning rate serves every divergence.
Orientation: **P = teacher, Q = generator, r = p_sigma / q_sigma**; each row minimises
``D_f(P || Q)`` along the noise levels.

**Learned critics** (as in DMD / VSD / f-distill, alternating with the generator, ``CRITIC_STEPS``
updates per generator step, after ``WARMUP`` updates on the initial generator):

* the *student ("fake") score* ``s_q(x_t, sigma) = -eps_hat(x_t, sigma) / sigma``, a 3-64-64-2 MLP
  trained by denoising score matching (``|eps_hat - eps|^2``) on noised generator samples;
* the *discriminator* ``d(x_t, sigma)``, a 3-64-64-1 MLP trained by logistic regression with
  teacher noised samples labelled 1 and generator noised samples labelled 0 (equal numbers):
  at its optimum ``d = log p_sigma(x_t) / q_sigma(x_t)``, so its logit is ``log r``.

**Metrics** on ``EVAL_SAMPLES`` generator samples from fixed latents against as many fresh
teacher samples (both fixed per seed): mode coverage (a sample belongs to the nearest mode when
it lies within ``ON_MODE`` of its centre; ``worst_mode`` is the worst mode's share times
``MODES``, 1 = every mode gets its ``1/MODES``; ``covered`` counts the modes holding at least
``COVERED / MODES``; ``off_mode`` is the share between modes), the energy distance to the teacher
sample (:func:`fdiv.samples.energy_distance`), and the generator's gradient noise: at
``GRAD_CHECKPOINTS`` of training, ``GRAD_BATCHES`` fresh mini-batches give gradient vectors
``g_m`` of the whole generator, and ``grad_noise = tr Cov(g) / |mean g|^2`` (noise-to-signal of
one mini-batch's gradient, scale-free), averaged over the checkpoints; ``weight_spread`` is the sd
of the normalised weights ``h / mean h`` within a mini-batch (0 for reverse KL), the source of the
extra noise.

**What a seed varies:** the generator's and the critics' initialisation and every random draw
(latents, noise levels, noise, teacher samples). Every divergence of a seed starts from the same
networks (after the same warm-up) and sees the same draws, so comparisons are paired by seed.
Every run (divergence x seed) is a slice of stacked weight tensors trained by one Adam (element-wise:
each trains as it would alone).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ... import get
from ...diffusion import batch_normalized_f_weight, f_distill_loss
from ...math.samples import energy_distance
from .. import decide, plotting
from ..decide import tie_notes
from ..optim import Adam
from ..study import BuiltinStudy, Figure, StudyContext, StudyResult, divergence_label, register_study

#: Study settings (recorded in ``StudyResult.config``).
MODES = 8
RING_RADIUS = 2.0
MODE_STD = 0.2
LATENT = 2
HIDDEN = 64
SIGMA_MIN, SIGMA_MAX = 0.05, 2.0
BATCH = 256
GEN_LR = 4e-3
CRITIC_LR = 3e-3
ADAM_BETAS = (0.5, 0.999)
CRITIC_STEPS = 2
WARMUP = 150
EVAL_SAMPLES = 1000
CURVE_SAMPLES = 400
ON_MODE = 3 * MODE_STD
COVERED = 0.25
GRAD_CHECKPOINTS = (0.0, 0.5, 1.0)
WORST_MODE_RESOLUTION = 0.05
OFF_MODE_RESOLUTION = 0.01
GRAD_NOISE_RESOLUTION = 0.1  # in log10: a factor 1.26
GRAD_BATCHES = 16
CURVE_POINTS = 9
SCATTER = 600  # samples per panel of the samples figure
DRAW_SEED_OFFSET = 7 * 10**6
EVAL_SEED_OFFSET = 8 * 10**6
GRAD_SEED_OFFSET = 9 * 10**6
METRICS = ("worst_mode", "covered", "off_mode", "energy", "log10_grad_noise", "weight_spread")
COLUMNS = list(METRICS)
UNITS = {
    "worst_mode": f"the worst mode's share of the samples times {MODES} (1 = every mode gets its 1/{MODES}, 0 = a mode "
    "dropped; higher is better)",
    "covered": f"modes holding at least {COVERED:g}/{MODES} of the samples (of {MODES})",
    "off_mode": f"share of the samples farther than {ON_MODE:g} from every mode centre (the teacher's own share is "
    "about 1 %; lower is better)",
    "energy": f"energy distance between {EVAL_SAMPLES} generator samples and {EVAL_SAMPLES} teacher samples (lower is "
    "better)",
    "log10_grad_noise": f"log10 of tr Cov / |mean|^2 of the generator's gradient over {GRAD_BATCHES} mini-batches of "
    f"{BATCH}, mean over {len(GRAD_CHECKPOINTS)} points of training (lower: a less noisy update; 0 = noise as large as "
    "the signal)",
    "weight_spread": "sd of the normalised f-distill weights h(r)/mean h within a mini-batch (0 for reverse KL)",
}


# ------------------------------------------------------------------------------ the teacher
def mode_centres(dtype=torch.float32) -> torch.Tensor:
    """``[MODES, 2]``: the mixture's means, evenly spaced on the circle of radius ``RING_RADIUS``."""
    angle = 2 * math.pi * torch.arange(MODES, dtype=torch.float64) / MODES
    return (RING_RADIUS * torch.stack([angle.cos(), angle.sin()], -1)).to(dtype)


def _component_terms(x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-component log-likelihoods ``[..., MODES]``, offsets ``mu_k - x`` ``[..., MODES, 2]`` and the variance."""
    variance = MODE_STD**2 + torch.as_tensor(sigma, dtype=x.dtype) ** 2
    if variance.dim():
        variance = variance.reshape(variance.shape + (1,) * (x.dim() - variance.dim()))
    offsets = mode_centres(x.dtype) - x.unsqueeze(-2)
    log_norm = -torch.log(2 * math.pi * variance)  # 2-D Gaussian
    log_lik = log_norm - offsets.pow(2).sum(-1) / (2 * variance)
    return log_lik, offsets, variance


def teacher_log_density(x: torch.Tensor, sigma) -> torch.Tensor:
    """``log p_sigma(x)`` of the noised teacher (mixture with variance ``MODE_STD^2 + sigma^2``); ``x`` ``[..., 2]``,
    ``sigma`` a number or broadcastable to ``x.shape[:-1]`` -> ``[...]``."""
    log_lik, _, _ = _component_terms(x, sigma)
    return torch.logsumexp(log_lik, -1) - math.log(MODES)


def teacher_score(x: torch.Tensor, sigma) -> torch.Tensor:
    """The exact noised score ``grad_x log p_sigma(x) = sum_k w_k(x) (mu_k - x) / (MODE_STD^2 + sigma^2)``, ``w`` the
    posterior over modes; ``[..., 2]``."""
    log_lik, offsets, variance = _component_terms(x, sigma)
    posterior = torch.softmax(log_lik, -1).unsqueeze(-1)
    return (posterior * offsets).sum(-2) / variance


def teacher_sample(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """``[*shape, 2]`` samples of the clean teacher."""
    mode = torch.randint(MODES, shape, generator=generator)
    return mode_centres()[mode] + MODE_STD * torch.randn(*shape, 2, generator=generator)


# ------------------------------------------------------------------------------ stacked MLPs
def init_mlp(generator: torch.Generator, sizes: tuple[int, ...], runs: int) -> list[torch.Tensor]:
    """``runs`` MLPs with layer sizes ``sizes`` as ``[w [runs, in, out], b [runs, 1, out], ...]``, initialised as
    :class:`torch.nn.Linear` does (uniform in +-1/sqrt(fan_in))."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1 / math.sqrt(fan_in)
        params.append((2 * torch.rand(runs, fan_in, fan_out, generator=generator) - 1) * bound)
        params.append((2 * torch.rand(runs, 1, fan_out, generator=generator) - 1) * bound)
    return params


def mlp(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Stacked MLPs (SiLU between layers): ``x [R, N, in] -> [R, N, out]``."""
    layers = len(params) // 2
    for i in range(layers):
        x = torch.baddbmm(params[2 * i + 1], x, params[2 * i])
        if i < layers - 1:
            x = torch.nn.functional.silu(x)
    return x


def _features(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The critics' input: ``x_t`` scaled to unit variance at every noise level, and ``log sigma``."""
    scale = torch.sqrt(RING_RADIUS**2 + sigma**2)
    return torch.cat([x_t / scale, torch.log(sigma)], -1)


def fake_score(params: list[torch.Tensor], x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The student score ``s_q = -eps_hat(x_t, sigma) / sigma``; ``x_t [R, N, 2]``, ``sigma [R, N, 1]``."""
    return -mlp(params, _features(x_t, sigma)) / sigma


def discriminator_logit(params: list[torch.Tensor], x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``log r = log p_sigma / q_sigma`` as the discriminator estimates it (teacher = class 1): ``[R, N]``."""
    return mlp(params, _features(x_t, sigma)).squeeze(-1)


# ------------------------------------------------------------------------------ one step of each player
class Draws:
    """Per-seed random streams shared by every divergence of a seed (paired comparisons)."""

    def __init__(self, seeds: list[int], offset: int, repeat: int):
        self.generators = [torch.Generator().manual_seed(seed + offset) for seed in seeds]
        self.repeat = repeat

    def _draw(self, fn) -> torch.Tensor:
        stacked = torch.stack([fn(g) for g in self.generators])
        return stacked.repeat(self.repeat, *([1] * (stacked.dim() - 1)))

    def normal(self, *shape) -> torch.Tensor:
        return self._draw(lambda g: torch.randn(*shape, generator=g))

    def sigma(self, n: int) -> torch.Tensor:
        """``[R, n, 1]`` noise levels, log-uniform in ``[SIGMA_MIN, SIGMA_MAX]``."""
        log_lo, log_hi = math.log(SIGMA_MIN), math.log(SIGMA_MAX)
        return self._draw(lambda g: torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, 1, generator=g)))

    def teacher(self, n: int) -> torch.Tensor:
        return self._draw(lambda g: teacher_sample((n,), g))


def critic_losses(gen, score, disc, draws: Draws) -> torch.Tensor:
    """Per-run denoising-score-matching loss of the student score plus the discriminator's logistic loss ``[R]``."""
    with torch.no_grad():
        x0 = mlp(gen, draws.normal(BATCH, LATENT))
    sigma, noise = draws.sigma(BATCH), draws.normal(BATCH, 2)
    x_t = x0 + sigma * noise
    dsm = (mlp(score, _features(x_t, sigma)) - noise).pow(2).sum(-1).mean(-1)
    sigma_p = draws.sigma(BATCH)
    x_tp = draws.teacher(BATCH) + sigma_p * draws.normal(BATCH, 2)
    logistic = (torch.nn.functional.softplus(-discriminator_logit(disc, x_tp, sigma_p)).mean(-1)
                + torch.nn.functional.softplus(discriminator_logit(disc, x_t, sigma)).mean(-1))
    return dsm + logistic


def generator_terms(gen, score, disc, draws: Draws):
    """One mini-batch of the generator's inputs: noised samples ``x_t`` with the generator's graph ``[R, B, 2]``,
    the teacher and student scores at them, the discriminator's ``log r`` ``[R, B]`` and ``sigma`` ``[R, B]``."""
    x0 = mlp(gen, draws.normal(BATCH, LATENT))
    sigma, noise = draws.sigma(BATCH), draws.normal(BATCH, 2)
    x_t = x0 + sigma * noise
    with torch.no_grad():
        detached = x_t.detach()
        s_p = teacher_score(detached, sigma)
        s_q = fake_score(score, detached, sigma)
        log_ratio = discriminator_logit(disc, detached, sigma)
    return x_t, s_p, s_q, log_ratio, sigma.squeeze(-1)


def generator_loss(x_t, s_p, s_q, log_ratio, sigma, divergence_of: list) -> torch.Tensor:
    """Sum over runs of :func:`fdiv.diffusion.f_distill_loss` (each run its own divergence and its own batch
    normalisation ``h / mean h``, time weight ``sigma^2``): the gradient of run ``r`` is its f-distill gradient."""
    return torch.stack([
        f_distill_loss(samples=x_t[r], teacher_score=s_p[r], fake_score=s_q[r], log_ratio=log_ratio[r],
                       divergence=div, weight_normalization="batch_mean", weights=sigma[r] ** 2)
        for r, div in enumerate(divergence_of)
    ]).sum()


def gradient_noise(gen, score, disc, draws: Draws, divergence_of: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per run: ``tr Cov(g) / |mean g|^2`` of the generator's gradient over ``GRAD_BATCHES`` mini-batches, and the
    mean within-batch sd of the normalised weights ``h / mean h`` (both ``[R]``)."""
    grads, spreads = [], []
    for _ in range(GRAD_BATCHES):
        x_t, s_p, s_q, log_ratio, sigma = generator_terms(gen, score, disc, draws)
        loss = generator_loss(x_t, s_p, s_q, log_ratio, sigma, divergence_of)
        parts = torch.autograd.grad(loss, gen)
        grads.append(torch.cat([p.reshape(p.shape[0], -1) for p in parts], -1))
        spreads.append(torch.stack([batch_normalized_f_weight(log_ratio=log_ratio[r], divergence=div).std()
                                    for r, div in enumerate(divergence_of)]))
    g = torch.stack(grads).double()  # [M, R, P]
    noise = g.var(0, unbiased=True).sum(-1)
    signal = g.mean(0).pow(2).sum(-1)
    return (noise / signal.clamp_min(1e-300)).float(), torch.stack(spreads).mean(0)


# ------------------------------------------------------------------------------ metrics
def mode_shares(x: torch.Tensor) -> torch.Tensor:
    """``[..., N, 2]`` samples -> ``[..., MODES]`` share of the samples within ``ON_MODE`` of each mode centre."""
    distance = (x.unsqueeze(-2) - mode_centres(x.dtype)).norm(dim=-1)  # [..., N, MODES]
    nearest = distance.argmin(-1, keepdim=True)
    on_mode = distance.gather(-1, nearest) <= ON_MODE
    hits = torch.zeros_like(distance).scatter_(-1, nearest, on_mode.to(distance.dtype))
    return hits.mean(-2)


def coverage(x: torch.Tensor) -> dict:
    """Mode-coverage metrics of one sample ``[N, 2]``."""
    shares = mode_shares(x)
    return {"worst_mode": float(shares.min() * MODES), "covered": int((shares >= COVERED / MODES).sum()),
            "off_mode": float(1 - shares.sum()), "shares": shares.tolist()}


def sample_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(energy_distance(x=x.double(), y=y.double()))


# ------------------------------------------------------------------------------ training
def train(divergences: list[tuple[str, dict]], seeds: list[int], steps: int, tick=lambda: None) -> dict:
    """Distil one generator per (divergence, seed): runs are divergence-major (``r = d * S + s``)."""
    labels = [divergence_label(n, p) for n, p in divergences]
    divs = [get(n, **p) for n, p in divergences]
    S, D = len(seeds), len(divergences)
    divergence_of = [divs[r // S] for r in range(D * S)]
    inits = [torch.Generator().manual_seed(seed) for seed in seeds]
    per_seed = [init_mlp(g, (LATENT, HIDDEN, HIDDEN, 2), 1) + init_mlp(g, (3, HIDDEN, HIDDEN, 2), 1)
                + init_mlp(g, (3, HIDDEN, HIDDEN, 1), 1) for g in inits]
    params = [torch.cat(ts) for ts in zip(*per_seed)]  # [S, ...]
    gen, score, disc = params[:6], params[6:12], params[12:]

    # warm-up of the critics on the initial generators (identical for every divergence of a seed)
    critics = [p.requires_grad_(True) for p in score + disc]
    warm_opt = Adam(critics, [CRITIC_LR] * len(critics), betas=ADAM_BETAS)
    warm_draws = Draws(seeds, DRAW_SEED_OFFSET, 1)
    for _ in range(WARMUP):
        warm_opt.zero_grad()
        critic_losses(gen, critics[:6], critics[6:], warm_draws).sum().backward()
        warm_opt.step()

    def spread(ts):
        return [t.detach().repeat(D, *([1] * (t.dim() - 1))).requires_grad_(True) for t in ts]

    gen, score, disc = spread(gen), spread(score), spread(disc)
    gen_opt = Adam(gen, [GEN_LR] * len(gen), betas=ADAM_BETAS)
    critic_opt = Adam(score + disc, [CRITIC_LR] * (len(score) + len(disc)), betas=ADAM_BETAS)
    draws = Draws(seeds, DRAW_SEED_OFFSET + 1, D)
    eval_draws = Draws(seeds, EVAL_SEED_OFFSET, D)
    z_eval = eval_draws.normal(EVAL_SAMPLES, LATENT)
    teacher_eval = eval_draws.teacher(EVAL_SAMPLES)[:S]
    teacher_floor = eval_draws.teacher(EVAL_SAMPLES)[:S]
    marks = sorted({round(f * steps) for f in GRAD_CHECKPOINTS})
    curve_marks = set(np.linspace(0, steps, CURVE_POINTS).round().astype(int).tolist())
    noise_at, spread_at, curves = {}, {}, {}
    initial = None
    for step in range(steps + 1):
        if step in marks:
            grad_draws = Draws(seeds, GRAD_SEED_OFFSET + step, D)
            noise_at[step], spread_at[step] = gradient_noise(gen, score, disc, grad_draws, divergence_of)
        if step in curve_marks:
            with torch.no_grad():
                x = mlp(gen, z_eval)
            if initial is None:
                initial = x[:S].clone()
            curves[step] = [sample_distance(x[r, :CURVE_SAMPLES], teacher_eval[r % S, :CURVE_SAMPLES])
                            for r in range(D * S)]
        if step == steps:
            break
        for _ in range(CRITIC_STEPS):
            critic_opt.zero_grad()
            critic_losses(gen, score, disc, draws).sum().backward()
            critic_opt.step()
        gen_opt.zero_grad()
        x_t, s_p, s_q, log_ratio, sigma = generator_terms(gen, score, disc, draws)
        generator_loss(x_t, s_p, s_q, log_ratio, sigma, divergence_of).backward()
        for p in gen:
            if not torch.isfinite(p.grad).all():
                raise FloatingPointError(f"non-finite generator gradient at step {step}")
        gen_opt.step()
        tick()
    with torch.no_grad():
        final = mlp(gen, z_eval)
    return {"labels": labels, "final": final, "initial": initial, "teacher": teacher_eval, "floor": teacher_floor,
            "noise": noise_at, "spread": spread_at, "curves": curves, "marks": marks,
            "networks": {"generator": gen, "score": score, "discriminator": disc}}


def per_seed_rows(out: dict, seeds: list[int]) -> tuple[list[dict], dict]:
    """The per-(divergence, seed) metric rows of a :func:`train` result, and each run's mode shares."""
    S = len(seeds)
    rows, shares = [], {}
    for r in range(len(out["labels"]) * S):
        label, s = out["labels"][r // S], r % S
        cover = coverage(out["final"][r])
        shares[f"{label} / seed {seeds[s]}"] = cover.pop("shares")
        rows.append({
            "divergence": label, "seed": seeds[s], **cover,
            "energy": sample_distance(out["final"][r], out["teacher"][s]),
            "log10_grad_noise": float(torch.stack([out["noise"][m][r] for m in out["marks"]]).log10().mean()),
            "weight_spread": float(torch.stack([out["spread"][m][r] for m in out["marks"]]).mean()),
        })
    return rows, shares


@register_study
class DiffusionStudy(BuiltinStudy):
    name = "diffusion"  # title, description and defaults: fdiv.lab.catalog (torch-free, read by --list)

    def execute(self, ctx: StudyContext, steps: int, out_dir) -> StudyResult:
        seeds = list(ctx.seeds)
        runs = len(ctx.divergences) * len(seeds)
        tick = ctx.ticker(steps, every=max(1, steps // 4),
                          unit=f"generator steps (each advances {runs} generators and their critics)")
        out = train(ctx.divergences, seeds, steps, tick)
        labels = out["labels"]
        per_seed, shares = per_seed_rows(out, seeds)
        rows = decide.aggregate(per_seed, keys=["divergence"], metrics=list(METRICS))
        S = len(seeds)
        start = [sample_distance(out["initial"][s], out["teacher"][s]) for s in range(S)]
        floor = [sample_distance(out["floor"][s], out["teacher"][s]) for s in range(S)]
        teacher_cover = [coverage(out["floor"][s]) for s in range(S)]
        start_cover = [coverage(out["initial"][s]) for s in range(S)]
        floor_mean = sum(floor) / S
        teacher_off = sum(c["off_mode"] for c in teacher_cover) / S

        def rec(goal, metric, higher, resolution, unit, caveat=""):
            return decide.recommend(
                goal=goal, metric=metric, samples=decide.samples_by(per_seed, metric=metric), higher_is_better=higher,
                study=self.name, resolution=resolution, unit=unit, caveat=caveat,
            ).to_json()

        recs = [
            rec("cover every mode of the teacher", "worst_mode", True, WORST_MODE_RESOLUTION,
                f"(worst mode's share x {MODES})"),
            rec("match the teacher's distribution", "energy", False, floor_mean,
                "(energy distance to a teacher sample)",
                caveat=f"resolution = the energy distance between two teacher samples of this size ({floor_mean:.2g})"),
            rec("sample quality (fewest samples between the modes)", "off_mode", False, OFF_MODE_RESOLUTION,
                "(share off every mode)"),
            rec("the least noisy generator update", "log10_grad_noise", False, GRAD_NOISE_RESOLUTION,
                "(log10 tr Cov / |mean|^2 of the gradient)",
                caveat="reverse KL's weight h = 1 is constant, so it adds no weight noise by construction; the "
                "measure is the noise of the whole update, score difference included"),
        ]
        by = {r["divergence"]: r for r in rows}
        order_noise = sorted(labels, key=lambda l: by[l]["log10_grad_noise"])
        order_spread = sorted(labels, key=lambda l: by[l]["weight_spread"])
        start_mean = sum(start) / S
        closest = recs[1]["best"]
        closer = [l for l in labels if by[l]["energy"] < start_mean]
        moved = ("every divergence moved the generator towards the teacher" if len(closer) == len(labels) else
                 f"{len(closer)} of {len(labels)} divergences moved the generator towards the teacher")
        noise = lambda l: 10 ** by[l]["log10_grad_noise"]  # noqa: E731
        finding = (
            f"From an untrained generator at energy distance {start_mean:.2f} from the teacher, {moved} (final "
            f"{min(by[l]['energy'] for l in labels):.3f} to {max(by[l]['energy'] for l in labels):.3f}; two teacher "
            f"samples differ by {floor_mean:.4f}). Closest: {' = '.join(closest)}; best worst-mode coverage: "
            f"{' = '.join(recs[0]['best'])}. The gradient is least noisy under {order_noise[0]} (noise-to-signal "
            f"{noise(order_noise[0]):.2g}) and noisiest under {order_noise[-1]} ({noise(order_noise[-1]):.2g})."
        )
        notes = self._notes(labels, by, per_seed, order_noise, order_spread, teacher_off, start_cover, steps)
        at = lambda m, k: float(out["noise"][m][k * S:(k + 1) * S].mean())  # noqa: E731
        spread = lambda m, k: float(out["spread"][m][k * S:(k + 1) * S].mean())  # noqa: E731
        notes.insert(1, "Gradient noise-to-signal by point of training (mean over seeds): " + "; ".join(
            f"step {m}: " + ", ".join(f"{label} {at(m, k):.2g}" for k, label in enumerate(labels)) for m in out["marks"]
        ) + ". At the start the generator is a blob where the discriminator's ratio is extreme, so the unbounded "
            "weights spread most there; within-batch sd of h / mean h at the first and last point: " + ", ".join(
            f"{label} {spread(out['marks'][0], k):.2f} -> {spread(out['marks'][-1], k):.2f}"
            for k, label in enumerate(labels)) + ".")
        notes += tie_notes(recs)
        figures = [
            self._plot_samples(out_dir / "samples.png", labels, out, recs[0]),
            self._plot_metrics(out_dir / "metrics.png", labels, per_seed, floor_mean),
            self._plot_training(out_dir / "training.png", labels, out, S, floor_mean),
        ]
        ctx.progress(steps, steps, "generator steps")
        return StudyResult(
            name=self.name, title=self.title, finding=finding, columns=COLUMNS, rows=rows, figures=figures,
            recommendations=recs, notes=notes, seeds=seeds,
            config={
                "teacher": f"{MODES} Gaussians (std {MODE_STD}) on a circle of radius {RING_RADIUS}; noised scores "
                "exact", "forward_process": "x_t = x_0 + sigma eps (variance exploding)",
                "sigma": f"log-uniform in [{SIGMA_MIN}, {SIGMA_MAX}]", "time_weight": "sigma^2",
                "orientation": "D_f(P || Q), P = teacher, Q = generator, r = p_sigma / q_sigma = exp(discriminator "
                "logit)",
                "generator": f"MLP {LATENT}-{HIDDEN}-{HIDDEN}-2 (SiLU), z ~ N(0, I)",
                "student_score": f"MLP 3-{HIDDEN}-{HIDDEN}-2 predicting eps, denoising score matching",
                "discriminator": f"MLP 3-{HIDDEN}-{HIDDEN}-1, logistic loss, teacher = class 1",
                "loss": "fdiv.diffusion.f_distill_loss(weight_normalization='batch_mean', weights=sigma^2)",
                "batch": BATCH, "steps": steps, "critic_steps_per_generator_step": CRITIC_STEPS, "warmup": WARMUP,
                "optimiser": f"Adam generator lr {GEN_LR}, critics lr {CRITIC_LR}, betas {ADAM_BETAS}",
                "eval_samples": EVAL_SAMPLES, "on_mode_radius": ON_MODE, "covered_share": f"{COVERED}/{MODES}",
                "grad_checkpoints": out["marks"], "grad_batches": GRAD_BATCHES,
                "start_energy": start, "teacher_floor_energy": floor,
                "teacher_off_mode": [c["off_mode"] for c in teacher_cover],
                "start_worst_mode": [c["worst_mode"] for c in start_cover],
                "mode_shares": shares, "per_seed_rows": per_seed,
                "seed_varies": "the networks' initialisation and every random draw (shared by the divergences)",
                "divergences": [divergence_label(n, p) for n, p in ctx.divergences], "device": "cpu",
            },
            units=dict(UNITS),
        )

    def _notes(self, labels, by, per_seed, order_noise, order_spread, teacher_off, start_cover, steps) -> list[str]:
        shown = lambda metric, fmt: ", ".join(f"{l} {by[l][metric]:{fmt}}" for l in labels)  # noqa: E731
        notes = [
            "Where the gradient noise comes from: every divergence's update is the same score difference "
            "(s_p - s_q) weighted by h(r) / mean h, and only the weight differs. Reverse KL's h = 1 is constant; "
            "js's h = r/(r+1) and hellinger's sqrt(r)/4 grow slowly or saturate; forward KL's h = r and jeffreys' "
            "r + 1 are unbounded, so a few samples where the discriminator says p >> q carry most of the batch. "
            f"Within-batch sd of h / mean h, mean over seeds: {shown('weight_spread', '.2f')}; gradient noise: "
            f"{shown('log10_grad_noise', '.2f')} (log10 noise-to-signal). "
            + ("The two orders agree." if order_noise == order_spread else
               f"Ordered by weight spread: {', '.join(order_spread)}; by gradient noise: {', '.join(order_noise)}."),
        ]
        all_covered = all(r["covered"] == MODES for r in per_seed)
        dropped = sorted({r["divergence"] for r in per_seed if r["covered"] < MODES})
        start_worst = sum(c["worst_mode"] for c in start_cover) / len(start_cover)
        notes.append(
            f"Coverage: the untrained generator is a blob at the centre (worst mode {start_worst:.2f}). "
            + ("After training every divergence puts at least "
               f"{COVERED:g}/{MODES} of its samples on every mode in every seed, reverse KL included: the mode-seeking "
               "of reverse KL (the modes study) does not drop a mode here, and the worst mode's share is what "
               f"differs. This is consistent with the largest noise levels (sigma up to {SIGMA_MAX:g}, where the "
               "noised "
               "teacher is a single bump over the ring), whose scores pull the blob outwards in every direction."
               if all_covered else
               f"Some runs leave a mode with less than {COVERED:g}/{MODES} of the samples: {', '.join(dropped)}.")
        )
        notes.append(
            f"Quality: {teacher_off:.1%} of a teacher sample lies farther than {ON_MODE:g} from every mode centre; "
            f"the generators after {steps} steps: {shown('off_mode', '.0%')}. "
            f"A continuous map from a {LATENT}-D Gaussian to {MODES} separated modes must pass between them, and "
            "the generators are not converged at this budget (see the energy curves)."
        )
        notes.append(
            "log r is a learned discriminator's logit, not the exact ratio: where the discriminator is wrong the "
            "weights are wrong (reverse KL does not use it). The student score is learned too, so even reverse KL "
            "follows an estimated gradient."
        )
        return notes

    def _plot_samples(self, path, labels, out, rec) -> Figure:
        S = out["initial"].shape[0]
        panels = [("untrained generator", out["initial"][0])] + [(l, out["final"][k * S]) for k, l in enumerate(labels)]
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, _ = plotting.new_figure(3.3 * cols, 3.2 * rows)
        fig.clf()
        lim = RING_RADIUS + 1.0
        axis = torch.linspace(-lim, lim, 160)
        gx, gy = torch.meshgrid(axis, axis, indexing="xy")
        density = teacher_log_density(torch.stack([gx, gy], -1), 0.0).exp().numpy()
        for index, (label, x) in enumerate(panels):
            ax = fig.add_subplot(rows, cols, index + 1)
            ax.contourf(gx.numpy(), gy.numpy(), density, levels=8, cmap="Greys", alpha=0.6)
            colour = plotting.NEUTRAL if index == 0 else plotting.colour_for(label)
            ax.scatter(*x[:SCATTER].T.numpy(), s=3, color=colour, alpha=0.6)
            ax.set_title(label, fontsize=9, color=colour)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
        plotting.save(fig, path, f"Generator samples (first seed); best worst-mode coverage: {' = '.join(rec['best'])}")
        return Figure(f"{self.name}/samples.png", "Where each distilled generator puts its samples",
                      f"Grey: the teacher's density ({MODES} Gaussians on a ring); dots: {SCATTER} samples of the generator from "
                      "the "
                      "same latents, before training and after distillation under each divergence (first seed).")

    def _plot_metrics(self, path, labels, per_seed, floor_mean) -> Figure:
        panels = (("worst_mode", f"worst mode's share x {MODES} (higher better)", False),
                  ("energy", "energy distance to the teacher (lower better)", False),
                  ("off_mode", "share between the modes (lower better)", False),
                  ("log10_grad_noise", "log10 gradient noise tr Cov / |mean|² (lower better)", False))
        fig, axes = plotting.new_figure(15.0, 4.0, ncols=len(panels))
        xs = np.arange(len(labels))
        for ax, (metric, title, log) in zip(axes, panels):
            for i, label in enumerate(labels):
                values = np.array([r[metric] for r in per_seed if r["divergence"] == label])
                colour = plotting.colour_for(label)
                ax.bar(i, values.mean(), color=colour, alpha=0.55)
                ax.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)), values, s=12,
                           color=colour, edgecolor="black", linewidth=0.4, zorder=3)
            if metric == "energy":
                ax.axhline(floor_mean, color=plotting.NEUTRAL, linestyle="--", linewidth=1, label="two teacher samples")
                ax.legend(fontsize=7)
            if log:
                ax.set_yscale("log")
            ax.set_xticks(xs, labels, rotation=30, fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        plotting.save(fig, path, "Coverage, distance to the teacher, quality and gradient noise per divergence")
        return Figure(f"{self.name}/metrics.png", "The metrics per divergence, every seed",
                      "Bars: mean over seeds; dots: one seed each. The dashed line is the energy distance between two "
                      "teacher samples of the same size (what no generator can beat).")

    def _plot_training(self, path, labels, out, S, floor_mean) -> Figure:
        fig, axes = plotting.new_figure(12.0, 4.2, ncols=2)
        steps = sorted(out["curves"])
        for k, label in enumerate(labels):
            colour = plotting.colour_for(label)
            energy = np.array([out["curves"][t][k * S:(k + 1) * S] for t in steps])
            noise = np.array([out["noise"][m][k * S:(k + 1) * S].numpy() for m in out["marks"]])
            for ax, xs, values in ((axes[0], steps, energy), (axes[1], out["marks"], noise)):
                mean = values.mean(1)
                sd = values.std(1, ddof=1) if values.shape[1] > 1 else np.zeros_like(mean)
                ax.plot(xs, mean, "-o", markersize=3, color=colour, label=label)
                ax.fill_between(xs, np.maximum(mean - sd, 1e-6), mean + sd, color=colour, alpha=0.12)
        axes[0].axhline(floor_mean, color=plotting.NEUTRAL, linestyle="--", linewidth=1, label="two teacher samples")
        axes[0].set_ylabel(f"energy distance to the teacher ({CURVE_SAMPLES} samples)")
        axes[1].set_ylabel("gradient noise tr Cov / |mean|²")
        for ax in axes:
            ax.set_yscale("log")
            ax.set_xlabel("generator step")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        plotting.save(fig, path, "Distance to the teacher during distillation, and the gradient's noise")
        return Figure(f"{self.name}/training.png", "Distillation curves",
                      "Left: energy distance between the generator's samples and a teacher sample during training "
                      "(mean "
                      "over seeds, band ± sd; dashed: two teacher samples). Right: noise-to-signal ratio of the "
                      f"generator's gradient over {GRAD_BATCHES} mini-batches at the start, middle and end of "
                      "training.")
