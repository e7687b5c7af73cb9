r"""Study ``robust``: what noise-robust, label-robust and distributionally robust losses change.

Task: the 8x8 handwritten digits of :func:`sklearn.datasets.load_digits` (bundled with
scikit-learn, no download), split and standardised as in the ``distill`` study (stratified
70/30 per seed, training statistics). The **test labels are always clean and balanced**; the
training labels are changed by a *condition*:

* ``clean``, ``noise 20%``, ``noise 40%``, ``noise 60%``: symmetric label noise: each training
  label is replaced, with probability ``rate``, by one of the other nine classes drawn uniformly.
  The draws are nested: a seed's flipped set at 20 % lies inside its flipped set at 40 %, with
  the same wrong labels, so the noise curves are not jagged by resampling;
* ``long tail 20:1``: clean labels, but class ``c`` of a seeded random class order (frequency
  rank ``k = 0..9``) keeps ``IMBALANCE^(-k/9)`` of its training images: about 126 for the most
  frequent class, 6 for the rarest.

A 64-32-10 MLP (ReLU) is trained on each condition with Adam on minibatches of ``BATCH``
training images (drawn with replacement) for a fixed step budget, once per objective:

* ``ce``: cross-entropy, :func:`fdiv.classification.comp_sum_loss` with ``tau = 1``;
* ``gce(q=0.7)``: generalised cross-entropy ``(1 - p_y^q)/q``, ``comp_sum_loss`` with
  ``tau = 1 + q`` (q = 0.7, the usual choice of Zhang & Sabuncu 2018);
* ``mae``: mean absolute error ``1 - p_y``, ``comp_sum_loss`` with ``tau = 2``;
* ``ldr_kl(lam=1)``, ``ldr_kl(lam=10)``: :func:`fdiv.classification.ldr_kl_loss` (margin 0.1) at
  two points of the paper's grid {0.1, 1, 10}: ``lam`` moves LDR-KL from the hinge-like
  (small) to the mean-margin (large, noise-tolerant) end;
* ``aldr_kl(lam0=10)``: :class:`fdiv.classification.ALDRKL` (``alpha = 2``), one adaptive
  ``lam_i`` per training image kept across steps;
* ``kl_dro(r=1)`` (and ``chi2_dro`` / ``tv_dro``): cross-entropy reweighted within each
  minibatch by the worst case of a divergence ball around the uniform weights,
  ``sum_i sg(w_i) l_i`` with ``w = argmax_w sum_i w_i l_i - r D(w || uniform)``
  (:func:`fdiv.robust.kl_dro_weights` for ``forward_kl``, :func:`fdiv.robust.dro_weights`
  for ``pearson_chi2`` and ``tv``). The study's ``divergences`` choose these balls (default
  ``forward_kl``); a divergence without a closed-form DRO dual is reported and skipped.

**What a seed varies:** the split, the noise draw, the long-tail subsample and class order, the
network's initialisation and the minibatch draws. Every objective of a (condition, seed) sees
the same labels, initial network and minibatches, so comparisons are paired by seed.

**Batched training.** Every network (objective x condition x seed) is one slice of stacked
weight tensors trained by one Adam (element-wise: each trains as it would alone; the tests
check one against a plain ``torch.optim.Adam`` loop). Each objective is one call per step over
all its conditions and seeds; the per-run mean losses are summed.

Metrics, on the clean test split: accuracy; worst-class accuracy (the lowest per-class
accuracy); ECE (:func:`fdiv.lab.studies.distill.expected_calibration_error`, 15 bins); and, under
label noise, ``memorised``: the share of the flipped training images the final network assigns
to their *wrong* label.

**Clustering panel.** No labels: the 1797 digits' standardised pixels projected on their first
``PCA_COMPONENTS`` principal components. k-means (``sklearn.cluster.KMeans``, 10 clusters, one
initialisation from ``random_state = seed``) against DEPICT's alternating E/M training
(:class:`fdiv.clustering.DepictSchedule`, :func:`fdiv.clustering.depict_loss`) of a linear
softmax clustering head with each target (``exact``, ``sqrt``, ``dec`` of
:func:`fdiv.clustering.depict_target`), from the k-means solution (the head whose softmax is the
k-means assignment) and from a small random head. Scores: NMI
(``sklearn.metrics.normalized_mutual_info_score``) and accuracy under the best one-to-one
matching of clusters to digits (:func:`scipy.optimize.linear_sum_assignment`).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ...classification import ALDRKL, comp_sum_loss, ldr_kl_loss
from ...clustering import DepictSchedule, depict_loss, depict_target
from ...robust import dro_weights, kl_dro_weights
from .. import decide, plotting
from ..decide import tie_notes
from ..optim import Adam
from ..study import BuiltinStudy, Figure, StudyContext, StudyResult, divergence_label, register_study
from .distill import ECE_BINS, _load_digits, expected_calibration_error, init_mlp, mlp_forward

#: Study settings (recorded in ``StudyResult.config``).
CLASSES = 10
NOISE_RATES = (0.0, 0.2, 0.4, 0.6)
MAIN_NOISE = 0.4  # the noise rate of the recommendations
IMBALANCE = 20.0  # most / least frequent class in the long-tailed training set
HIDDEN = 32
LR = 1e-2
ADAM_BETAS = (0.9, 0.999)
BATCH = 128
GCE_Q = 0.7
LDR_LAMS = (1.0, 10.0)
LDR_MARGIN = 0.1
ALDR_LAM0 = 10.0
ALDR_ALPHA = 2.0
DRO_LAM = 1.0  # r of KL-DRO; lam of the chi2 and TV balls
#: the DRO balls the study's divergences may name: registry name -> (fdiv.robust name, row label)
DRO_BALLS = {"forward_kl": ("kl", "kl_dro"), "pearson_chi2": ("chi2", "chi2_dro"), "tv": ("tv", "tv_dro")}
NOISE_SEED_OFFSET = 3 * 10**6
TAIL_SEED_OFFSET = 4 * 10**6
BATCH_SEED_OFFSET = 2 * 10**6
CURVE_POINTS = 15
PCA_COMPONENTS = 16
CLUSTER_STEPS = 40
REFRESH_EVERY = 5  # M-steps between two E-steps (target refreshes)
CLUSTER_LR = {"k-means start": 1e-2, "random start": 5e-2}
RANDOM_HEAD_STD = 0.1
RANDOM_HEAD_SEED_OFFSET = 5 * 10**6
DEPICT_MODES = ("exact", "sqrt", "dec")
NMI_RESOLUTION = 0.005
METRICS = ("accuracy", "worst_class", "ece", "memorised")
COLUMNS = ["condition", *METRICS, "nmi", "cluster_acc"]
UNITS = {
    "condition": "the training labels: clean, symmetric noise at a rate, or a long-tailed (20:1) class distribution; "
    "'clustering': the unsupervised panel (no labels)",
    "accuracy": "fraction of the clean, balanced test split classified correctly (higher is better)",
    "worst_class": "the lowest per-class test accuracy (higher is better)",
    "ece": f"expected calibration error on the test split, {ECE_BINS} equal-width confidence bins (lower is better)",
    "memorised": "share of the flipped training images predicted as their wrong label (label-noise conditions; "
    "lower means the wrong labels were not learnt)",
    "nmi": "normalised mutual information between the clusters and the true digits (higher is better)",
    "cluster_acc": "accuracy of the clusters under the best one-to-one matching to digits (higher is better)",
}


def condition_label(kind: str, rate: float = 0.0) -> str:
    if kind == "tail":
        return f"long tail {IMBALANCE:g}:1"
    return "clean" if rate == 0 else f"noise {rate:.0%}"


CONDITIONS = [("noise", rate) for rate in NOISE_RATES] + [("tail", 0.0)]
MAIN = condition_label("noise", MAIN_NOISE)
CLEAN = condition_label("noise", 0.0)
TAIL = condition_label("tail")


# ------------------------------------------------------------------------------ data
def noisy_labels(labels: torch.Tensor, seed: int, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric noise: ``(labels with a share ~rate replaced by another class, flipped mask)``. The draw
    depends on the seed only, so a larger rate flips a superset with the same wrong labels."""
    g = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)
    u = torch.rand(labels.shape, generator=g)
    offset = torch.randint(1, CLASSES, labels.shape, generator=g)
    flipped = u < rate
    return torch.where(flipped, (labels + offset) % CLASSES, labels), flipped


def long_tail_pool(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Indices of a long-tailed subsample (class of frequency rank k keeps IMBALANCE^(-k/9) of its images,
    at least one) and the class order (most frequent first)."""
    g = torch.Generator().manual_seed(seed + TAIL_SEED_OFFSET)
    order = torch.randperm(CLASSES, generator=g).tolist()
    keep = []
    for rank, c in enumerate(order):
        members = (labels == c).nonzero().squeeze(-1)
        count = max(1, round(len(members) * IMBALANCE ** (-rank / (CLASSES - 1))))
        keep.append(members[torch.randperm(len(members), generator=g)[:count]])
    return torch.cat(keep).sort().values, order


def make_conditions(y_train: torch.Tensor, seeds: list[int]) -> dict:
    """Per run (condition-major, seed-minor: run = c * S + s): training labels [R, N], the pool of training
    indices each run draws from (padded [R, n_max] with its size [R]), flipped masks [R, N], the seed index of
    each run [R] and each seed's long-tail class order."""
    labels, pools, flipped, orders = [], [], [], {}
    n = y_train.shape[1]
    for kind, rate in CONDITIONS:
        for s, seed in enumerate(seeds):
            if kind == "noise":
                y, flips = noisy_labels(y_train[s].cpu(), seed, rate)
                pool = torch.arange(n)
            else:
                y, flips = y_train[s].cpu(), torch.zeros(n, dtype=torch.bool)
                pool, orders[seed] = long_tail_pool(y, seed)
            labels.append(y)
            flipped.append(flips)
            pools.append(pool)
    sizes = torch.tensor([len(p) for p in pools])
    padded = torch.stack([torch.cat([p, p.new_zeros(int(sizes.max()) - len(p))]) for p in pools])
    seed_of = torch.arange(len(seeds)).repeat(len(CONDITIONS))
    device = y_train.device
    return {"labels": torch.stack(labels).to(device), "pools": padded.to(device), "sizes": sizes.to(device),
            "flipped": torch.stack(flipped).to(device), "seed_of": seed_of.to(device), "orders": orders}


# ------------------------------------------------------------------------------ objectives
def objectives(divergences: list[tuple[str, dict]], num_examples: int):
    """The list of ``(label, loss(logits [R, B, K], labels [R, B], indices [R, B]) -> per-run mean loss [R])`` for every
    objective (``indices`` are dataset indices, unique per run), notes on divergences that were skipped, and
    the ALDR-KL state (sized ``num_examples``: runs x training images)."""
    def comp_sum(tau):
        return lambda z, y, i: comp_sum_loss(logits=z, labels=y, tau=tau, reduction="none").mean(-1)

    def ldr(lam):
        return lambda z, y, i: ldr_kl_loss(logits=z, labels=y, lam=lam, margin=LDR_MARGIN, reduction="none").mean(-1)

    aldr = ALDRKL(num_examples=num_examples, lam0=ALDR_LAM0, alpha=ALDR_ALPHA, margin=LDR_MARGIN)

    def aldr_loss(z, y, i):
        rows = aldr(logits=z.reshape(-1, z.shape[-1]), labels=y.reshape(-1), indices=i.reshape(-1), reduction="none")
        return rows.reshape(y.shape).mean(-1)

    out = [("ce", comp_sum(1.0)), (f"gce(q={GCE_Q:g})", comp_sum(1.0 + GCE_Q)), ("mae", comp_sum(2.0))]
    out += [(f"ldr_kl(lam={lam:g})", ldr(lam)) for lam in LDR_LAMS]
    out.append((f"aldr_kl(lam0={ALDR_LAM0:g})", aldr_loss))
    skipped = []
    for name, params in divergences:
        if name not in DRO_BALLS or params:
            skipped.append(divergence_label(name, params))
            continue
        ball, short = DRO_BALLS[name]
        out.append((f"{short}({'r' if ball == 'kl' else 'lam'}={DRO_LAM:g})", _dro_loss(ball)))
    notes = []
    if skipped:
        notes.append(f"Not run: {', '.join(skipped)} — fdiv.robust has closed-form DRO weights only for "
                     f"{', '.join(DRO_BALLS)} (KL, chi2, TV balls around the uniform weights).")
    return out, notes, aldr


def batch_weights(ball: str, losses: torch.Tensor) -> torch.Tensor:
    """Detached worst-case weights of a ``ball`` (``kl``, ``chi2``, ``tv``) over each row of ``losses``."""
    if ball == "kl":
        return kl_dro_weights(losses=losses, temperature=DRO_LAM)
    uniform = torch.full_like(losses, 1.0 / losses.shape[-1])
    return dro_weights(values=losses.detach(), probs=uniform, lam=DRO_LAM, divergence=ball, sense="sup").detach()


def _dro_loss(ball: str):
    def loss(z, y, i):
        ce = comp_sum_loss(logits=z, labels=y, tau=1.0, reduction="none")
        return (batch_weights(ball, ce) * ce).sum(-1)
    return loss


# ------------------------------------------------------------------------------ training
def draw_batches(seeds: list[int], runs_per_seed: int, batch: int = BATCH):
    """An endless stream of ``[runs_per_seed, S, batch]`` uniforms, one generator per seed (a seed's numbers
    do not depend on the other seeds of the run); position = floor(u * pool size)."""
    generators = [torch.Generator().manual_seed(s + BATCH_SEED_OFFSET) for s in seeds]
    while True:
        yield torch.stack([torch.rand(runs_per_seed, batch, generator=g) for g in generators], 1)


def train(objective_list, data: dict, x_train, x_test, y_test, seeds: list[int], steps: int, tick=lambda: None,
          batch: int = BATCH):
    """Train every objective on every run (condition x seed) from the seed's initial network. Returns the final
    parameters ``[G, R, ...]`` and the test-accuracy curve ``(steps, [points, G, R])``."""
    device = x_train.device
    seed_of, pools, sizes, labels = data["seed_of"], data["pools"], data["sizes"], data["labels"]
    n_runs, n_train, groups = len(seed_of), x_train.shape[1], len(objective_list)
    initial = [init_mlp(torch.Generator().manual_seed(s), HIDDEN) for s in seeds]
    params = []
    for j in range(4):
        per_run = torch.stack([initial[int(s)][j] for s in seed_of.tolist()]).to(device)
        params.append(per_run.expand(groups, *per_run.shape).clone().requires_grad_(True))
    optimiser = Adam(params, [LR] * len(params), betas=ADAM_BETAS)
    draws = draw_batches(seeds, n_runs // len(seeds), batch)
    x_eval, y_eval = x_test[seed_of], y_test[seed_of]
    every = max(1, steps // CURVE_POINTS)
    points, curve = [], []
    offsets = torch.arange(n_runs, device=device)[:, None] * n_train
    for step in range(1, steps + 1):
        u = next(draws).reshape(n_runs, batch).to(device)  # condition-major, seed-minor, as the runs
        index = torch.gather(pools, 1, (u * sizes[:, None]).long())  # [R, B] training indices
        x = x_train[seed_of[:, None], index]
        y = torch.gather(labels, 1, index)
        optimiser.zero_grad()
        logits = mlp_forward(params, x)  # [G, R, B, K]
        losses = [loss(logits[g], y, offsets + index) for g, (_, loss) in enumerate(objective_list)]
        total = torch.stack(losses).sum()
        if not torch.isfinite(total):
            bad = [label for (label, _), v in zip(objective_list, losses) if not torch.isfinite(v).all()]
            raise FloatingPointError(f"loss became non-finite at step {step}: {', '.join(bad)}")
        total.backward()
        optimiser.step()
        tick()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                curve.append((mlp_forward(params, x_eval).argmax(-1) == y_eval).float().mean(-1))
                points.append(step)
    return [p.detach() for p in params], (points, torch.stack(curve) if curve else torch.zeros(0, groups, n_runs))


def classification_metrics(*, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Test accuracy, worst-class accuracy, ECE and the per-class accuracies of one network."""
    probs = torch.softmax(logits.detach().double(), -1)
    correct = (probs.argmax(-1) == labels).double()
    per_class = [float(correct[labels == c].mean()) for c in range(CLASSES)]
    return {"accuracy": float(correct.mean()), "worst_class": min(per_class),
            "ece": expected_calibration_error(probs, labels), "per_class": per_class}


# ------------------------------------------------------------------------------ clustering panel
def cluster_features() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: standardised pixels on their first PCA_COMPONENTS principal components, scaled to unit
    overall standard deviation (float64), and the true digits."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    data = load_digits()
    x = data.data - data.data.mean(0)
    std = data.data.std(0)
    x = x / np.where(std == 0, 1.0, std)
    features = PCA(n_components=PCA_COMPONENTS, svd_solver="full").fit_transform(x)
    return features / features.std(), data.target


def kmeans(features: np.ndarray, seed: int):
    """k-means with one initialisation from ``random_state=seed`` (the fitted sklearn estimator)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=CLASSES, n_init=1, random_state=seed).fit(features)


def cluster_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Share of examples whose cluster maps to their class under the best one-to-one matching."""
    from scipy.optimize import linear_sum_assignment

    k = int(max(truth.max(), predicted.max())) + 1
    counts = np.zeros((k, k))
    np.add.at(counts, (predicted, truth), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(truth))


def kmeans_head(fit, features: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear head whose softmax is a Gaussian soft k-means assignment: ``logit_k = -|x - mu_k|^2 / (2 s^2)``
    up to a per-row constant (``s^2`` the mean within-cluster variance per dimension); its argmax is k-means'."""
    centres = torch.tensor(fit.cluster_centers_, dtype=torch.float64)
    variance = fit.inertia_ / features.size
    return centres.T / variance, (-(centres**2).sum(1) / (2 * variance))[None]


def depict_panel(features: np.ndarray, truth: np.ndarray, seeds: list[int], steps: int, tick=lambda: None):
    """k-means and DEPICT (each target, from the k-means head and from a random head) per seed. Returns per-seed
    rows and the mean total-variation distance between the exact and sqrt targets at the k-means start."""
    from sklearn.metrics import normalized_mutual_info_score

    x = torch.tensor(features, dtype=torch.float64)
    fits = [kmeans(features, seed) for seed in seeds]
    rows = []
    for seed, fit in zip(seeds, fits):
        rows.append({"divergence": "k-means", "condition": "clustering", "seed": seed,
                     "nmi": float(normalized_mutual_info_score(truth, fit.labels_)),
                     "cluster_acc": cluster_accuracy(truth, fit.labels_)})
    runs = [(start, mode, s) for start in CLUSTER_LR for mode in DEPICT_MODES for s in range(len(seeds))]
    heads = {start: ([], []) for start in CLUSTER_LR}
    for start, _, s in runs:
        if start == "k-means start":
            w, b = kmeans_head(fits[s], features)
        else:
            g = torch.Generator().manual_seed(seeds[s] + RANDOM_HEAD_SEED_OFFSET)
            w = RANDOM_HEAD_STD * torch.randn(PCA_COMPONENTS, CLASSES, generator=g, dtype=torch.float64)
            b = torch.zeros(1, CLASSES, dtype=torch.float64)
        heads[start][0].append(w)
        heads[start][1].append(b)
    params = [torch.stack(t).requires_grad_(True) for start in CLUSTER_LR for t in heads[start]]
    optimiser = Adam(params, [CLUSTER_LR[start] for start in CLUSTER_LR for _ in range(2)], betas=ADAM_BETAS)
    head = lambda: (torch.cat(params[0::2]), torch.cat(params[1::2]))  # noqa: E731  [runs, d, K], [runs, 1, K]
    schedules = [DepictSchedule(mode=mode, refresh_every=REFRESH_EVERY) for _, mode, _ in runs]
    with torch.no_grad():
        w, b = head()
        start_probs = torch.softmax(x @ w[0] + b[0], -1)
        gap = float(0.5 * (depict_target(probs=start_probs, mode="exact")
                           - depict_target(probs=start_probs, mode="sqrt")).abs().sum(-1).mean())
    n = x.shape[0]
    for _ in range(steps):
        w, b = head()
        logits = x @ w + b  # [runs, N, K]
        probs = torch.softmax(logits.detach(), -1)
        targets = []
        for r, schedule in enumerate(schedules):
            if schedule.due:
                schedule.refresh(probs=probs[r])
            targets.append(schedule.target())
            schedule.step()
        optimiser.zero_grad()
        # one call for all runs: the loss is a sum over rows, so each run's head gets its own mean-loss gradient
        depict_loss(target=torch.cat(targets), logits=logits.reshape(-1, CLASSES), reduction="sum").div(n).backward()
        optimiser.step()
        tick()
    with torch.no_grad():
        w, b = head()
        predicted = (x @ w + b).argmax(-1).numpy()
    for r, (start, mode, s) in enumerate(runs):
        rows.append({"divergence": f"depict({mode}, {start})", "condition": "clustering", "seed": seeds[s],
                     "nmi": float(normalized_mutual_info_score(truth, predicted[r])),
                     "cluster_acc": cluster_accuracy(truth, predicted[r]),
                     "target_change": schedules[r].change if math.isfinite(schedules[r].change) else None})
    return rows, gap


# ------------------------------------------------------------------------------ decisions and words
def recommendations(per_seed: list[dict], labels: list[str], test_size: int, class_size: int,
                    cluster_rows: list[dict], study: str = "robust") -> list[dict]:
    goals = (
        ("accuracy", MAIN, f"test accuracy when {MAIN_NOISE:.0%} of the training labels are wrong", True,
         1.0 / test_size, ""),
        ("worst_class", TAIL, f"worst-class test accuracy after a long-tailed ({IMBALANCE:g}:1) training set", True,
         1.0 / class_size, "one class's accuracy: its spread over seeds is large"),
        ("ece", MAIN, f"calibration (ECE) when {MAIN_NOISE:.0%} of the training labels are wrong", False,
         1.0 / test_size, "ECE is 0 for any model whose confidence equals its accuracy, however inaccurate: read "
         "it with accuracy"),
        ("accuracy", CLEAN, "test accuracy with clean labels (what robustness costs)", True, 1.0 / test_size, ""),
    )
    recs = []
    for metric, condition, goal, higher, resolution, caveat in goals:
        samples = decide.samples_by(per_seed, metric=metric, where={"condition": condition})
        recs.append(decide.recommend(
            goal=goal, metric=metric, samples={k: samples[k] for k in labels if k in samples}, higher_is_better=higher,
            study=study, resolution=resolution, caveat=caveat,
        ).to_json())
    recs.append(decide.recommend(
        goal="cluster unlabelled digits (PCA features): NMI with the true digits", metric="nmi",
        samples=decide.samples_by(cluster_rows, metric="nmi"), higher_is_better=True, study=study,
        resolution=NMI_RESOLUTION, caveat="a linear clustering head on fixed PCA features, not DEPICT's "
        "convolutional autoencoder",
    ).to_json())
    return recs


def _shown(rec: dict, name: str) -> str:
    v = rec["values"][name]
    return f"{name} {v['mean']:.3f} ± {v['sd']:.3f}"


def _answer(rec: dict) -> str:
    best = rec["best"]
    if len(best) == len(rec["values"]) and len(best) > 1:
        return f"all {len(best)} tie"
    return (f"{_shown(rec, best[0])} best" if len(best) == 1
            else f"{', '.join(_shown(rec, b) for b in best)} tie for best")


def _mean(rows: list[dict], label: str, condition: str, metric: str) -> float:
    values = [r[metric] for r in rows if r["divergence"] == label and r["condition"] == condition
              and isinstance(r.get(metric), (int, float))]
    return float(np.mean(values)) if values else math.nan


def _finding(recs: list[dict], per_seed: list[dict], seeds: int) -> str:
    noisy, tail, _, clean, cluster = recs
    return (
        f"With {MAIN_NOISE:.0%} wrong training labels, test accuracy: {_answer(noisy)} (ce "
        f"{_mean(per_seed, 'ce', MAIN, 'accuracy'):.3f}, which reproduces "
        f"{_mean(per_seed, 'ce', MAIN, 'memorised'):.0%} of the wrong labels). Long-tailed training, worst class: "
        f"{_answer(tail)}. Clean labels: {_answer(clean)}. Clustering digits (NMI): {_answer(cluster)}. "
        f"Mean ± sd over {seeds} seed{'s' if seeds != 1 else ''}; ties within 2 paired standard errors."
    )


def _notes(per_seed, labels, curves, data, aldr, dro_shares, cluster_rows, gap) -> list[str]:
    notes = []
    line = lambda label: ", ".join(  # noqa: E731
        f"{condition_label('noise', rate)} {_mean(per_seed, label, condition_label('noise', rate), 'accuracy'):.3f}"
        for rate in NOISE_RATES)
    notes.append("Test accuracy by noise rate (mean over seeds): " + "; ".join(f"{label}: {line(label)}"
                                                                               for label in labels) + ".")
    memorised = {label: _mean(per_seed, label, MAIN, "memorised") for label in labels}
    ordered = sorted(labels, key=lambda label: memorised[label])
    notes.append(
        f"Wrong labels learnt: at {MAIN_NOISE:.0%} noise the share of flipped training images the network ends up "
        "predicting as their wrong label is "
        + ", ".join(f"{label} {memorised[label]:.0%}" for label in ordered)
        + ". Cross-entropy's gradient on an example grows as p_y -> 0, so a wrongly labelled image keeps pulling "
        "until it is fitted; MAE's is bounded (proportional to p_y), GCE's in between, and a large lam moves "
        "LDR-KL toward the mean margin, which is bounded too.")
    points, accuracy = curves
    g = labels.index("ce")
    runs = [r for r, c in enumerate(_run_conditions(data)) if c == MAIN]
    if len(points) > 1:
        ce_curve = accuracy[:, g, runs].double().mean(-1)
        peak = int(ce_curve.argmax())
        if ce_curve[peak] - ce_curve[-1] > 0.01:
            notes.append(
                f"Early stopping would have saved part of this: ce's test accuracy at {MAIN_NOISE:.0%} noise peaked at "
                f"{float(ce_curve[peak]):.3f} (step {points[peak]}) and fell to {float(ce_curve[-1]):.3f} at the end "
                "as it fitted the wrong labels (figure: training curves).")
    for label, (share, noise_share) in dro_shares.items():
        text = (f"{label} at {MAIN_NOISE:.0%} noise puts {share:.0%} of its worst-case weight (computed from the final "
                f"network's cross-entropy on the whole training set) on the flipped images, {noise_share:.0%} of the "
                "data")
        if share > noise_share:
            text += (": a DRO ball up-weights the largest losses, and with wrong labels those are the wrong labels, "
                     "so instance-level DRO works against label noise rather than for it.")
        else:
            text += ": here the largest losses are not mostly the wrong labels."
        notes.append(text)
    if aldr is not None:
        label = next(lb for lb in labels if lb.startswith("aldr_kl"))
        lam = aldr.lambdas.cpu().reshape(len(data["seed_of"]), -1)
        flips = data["flipped"].cpu()
        noisy_lam = float(torch.cat([lam[r][flips[r]] for r in runs]).mean())
        clean_lam = float(torch.cat([lam[r][~flips[r]] for r in runs]).mean())
        notes.append(
            f"{label}'s adaptive lam_i at {MAIN_NOISE:.0%} noise (mean at the end): {noisy_lam:.2f} on flipped images, "
            f"{clean_lam:.2f} on the others (lam0 {ALDR_LAM0:g}); a large lam_i makes an example's loss close to "
            "its mean margin (bounded influence), a small one close to the hinge.")
    tail_ce = _mean(per_seed, "ce", TAIL, "worst_class")
    weak = [label for label in labels if _mean(per_seed, label, TAIL, "worst_class") < 0.5 * tail_ce]
    if weak:
        notes.append(
            f"The flip side under the long tail: worst-class accuracy of {', '.join(weak)} is below half of ce's "
            f"({tail_ce:.3f}): "
            + ", ".join(f"{label} {_mean(per_seed, label, TAIL, 'worst_class'):.3f}" for label in weak)
            + ". A bounded loss gives little gradient to examples the model gets confidently wrong, whether their "
            "label is wrong or their class is rare, so a class with a handful of images is never learnt.")
    by = {}
    for row in cluster_rows:
        by.setdefault(row["divergence"], []).append(row["nmi"])
    km = np.array(by["k-means"])
    starts = []
    for start in CLUSTER_LR:
        diffs = {mode: np.array(by[f"depict({mode}, {start})"]) - km for mode in DEPICT_MODES}
        starts.append(f"{start}: " + ", ".join(f"{mode} {d.mean():+.3f}" for mode, d in diffs.items()))
    notes.append(
        "DEPICT minus k-means NMI, mean paired difference over seeds — " + "; ".join(starts)
        + f". At the k-means start the exact and square-root targets differ by {gap:.2g} in total variation per "
        "image (the square-root form assumes every row shares one normaliser); the DEC target has no frequency "
        "prior and sharpens the assignments instead.")
    return notes


def _run_conditions(data: dict) -> list[str]:
    seeds = int(data["seed_of"].max()) + 1
    return [condition_label(kind, rate) for kind, rate in CONDITIONS for _ in range(seeds)]


# ------------------------------------------------------------------------------ figures
def _colour(label: str) -> str:
    if label == "ce":
        return plotting.NEUTRAL
    fixed = {"gce": "#2ca02c", "mae": "#ff7f0e", "aldr_kl": "#8c564b"}
    head = label.split("(")[0]
    if head in fixed:
        return fixed[head]
    if label == f"ldr_kl(lam={LDR_LAMS[0]:g})":
        return "#e377c2"
    if head == "ldr_kl":
        return "#d62728"
    ball = {short: name for name, (_, short) in DRO_BALLS.items()}.get(head)
    return plotting.colour_for(ball or label)


def _plot_noise(path, per_seed, labels, title) -> None:
    panels = (("accuracy", "test accuracy"), ("worst_class", "worst-class test accuracy"),
              ("ece", "ECE (lower is better)"))
    fig, axes = plotting.new_figure(13.0, 4.0, ncols=3)
    rates = [100 * r for r in NOISE_RATES]
    for ax, (metric, name) in zip(axes, panels):
        for label in labels:
            values = np.array([[r[metric] for r in per_seed if r["divergence"] == label
                                and r["condition"] == condition_label("noise", rate)] for rate in NOISE_RATES])
            mean = values.mean(1)
            sd = values.std(1, ddof=1) if values.shape[1] > 1 else np.zeros_like(mean)
            ax.plot(rates, mean, "-o", markersize=4, color=_colour(label), label=label)
            ax.fill_between(rates, mean - sd, mean + sd, color=_colour(label), alpha=0.12)
        ax.set_xlabel("symmetric label noise in training (%)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    plotting.save(fig, path, title)


def _plot_tail(path, per_seed, labels, orders, counts, title) -> None:
    fig, ax = plotting.new_figure(9.0, 4.2)
    ranks = np.arange(CLASSES)
    for label in labels:
        rows = [r for r in per_seed if r["divergence"] == label and r["condition"] == TAIL]
        by_rank = np.array([[r["per_class"][orders[r["seed"]][k]] for k in ranks] for r in rows])
        ax.plot(ranks, by_rank.mean(0), "-o", markersize=4, color=_colour(label), label=label)
    ax.set_xticks(ranks, [f"{k}\n({c:.0f})" for k, c in zip(ranks, counts)], fontsize=8)
    ax.set_xlabel("class by training frequency (rank; mean training images)")
    ax.set_ylabel("test accuracy of the class")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    plotting.save(fig, path, title)


def _plot_curves(path, curves, labels, runs, title) -> None:
    points, accuracy = curves
    fig, ax = plotting.new_figure(8.5, 4.2)
    for g, label in enumerate(labels):
        values = accuracy[:, g, runs].double().numpy()
        mean = values.mean(1)
        sd = values.std(1, ddof=1) if values.shape[1] > 1 else np.zeros_like(mean)
        ax.plot(points, mean, "-", color=_colour(label), label=label)
        ax.fill_between(points, mean - sd, mean + sd, color=_colour(label), alpha=0.12)
    ax.set_xlabel(f"training step ({BATCH} images per step)")
    ax.set_ylabel("clean test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    plotting.save(fig, path, title)


def _plot_clustering(path, cluster_rows, title) -> None:
    methods = list(dict.fromkeys(r["divergence"] for r in cluster_rows))
    fig, axes = plotting.new_figure(12.0, 4.4, ncols=2)
    mode_colour = {"exact": "#1f77b4", "sqrt": "#17becf", "dec": "#d62728"}
    panels = (("nmi", "NMI with the true digits"), ("cluster_acc", "accuracy, best matching"))
    for ax, (metric, name) in zip(axes, panels):
        for i, method in enumerate(methods):
            values = np.array([r[metric] for r in cluster_rows if r["divergence"] == method])
            mode = next((m for m in DEPICT_MODES if f"({m}," in method), None)
            colour = mode_colour[mode] if mode else plotting.NEUTRAL
            hatch = "//" if "random" in method else None
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.bar(i, values.mean(), yerr=sd, color=colour, alpha=0.6, hatch=hatch, edgecolor="black", capsize=3)
            ax.scatter(np.full(len(values), i), values, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(methods)), [m.replace(", ", ",\n") for m in methods], fontsize=7, rotation=30)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    plotting.save(fig, path, title)


# ------------------------------------------------------------------------------ the study
@register_study
class RobustStudy(BuiltinStudy):
    name = "robust"  # title, description and defaults: fdiv.lab.catalog (torch-free, read by --list)

    def execute(self, ctx: StudyContext, steps: int, out_dir) -> StudyResult:
        start = time.perf_counter()
        seeds, device = list(ctx.seeds), ctx.device
        x_train, y_train, x_test, y_test = _load_digits(seeds, device)
        data = make_conditions(y_train, seeds)
        n_runs, n_train = len(data["seed_of"]), int(x_train.shape[1])
        objective_list, notes, aldr = objectives(ctx.divergences, n_runs * n_train)
        labels = [label for label, _ in objective_list]
        total = steps + CLUSTER_STEPS
        tick = ctx.ticker(total, every=max(1, total // 10),
                          unit=f"training steps ({steps} for {len(labels) * n_runs} classifiers, then "
                          f"{CLUSTER_STEPS} for {len(CLUSTER_LR) * len(DEPICT_MODES) * len(seeds)} clustering heads, "
                          "batched)")
        params, curves = train(objective_list, data, x_train, x_test, y_test, seeds, steps, tick)
        conditions = _run_conditions(data)
        per_seed = []
        with torch.no_grad():
            test_logits = mlp_forward(params, x_test[data["seed_of"]])  # [G, R, M, K]
            train_logits = mlp_forward(params, x_train[data["seed_of"]])  # [G, R, N, K]
        in_pool = torch.zeros_like(data["flipped"])
        for r in range(n_runs):
            in_pool[r, data["pools"][r, : int(data["sizes"][r])]] = True
        for g, label in enumerate(labels):
            for r, condition in enumerate(conditions):
                s = int(data["seed_of"][r])
                row = {"divergence": label, "condition": condition, "seed": seeds[s],
                       **classification_metrics(logits=test_logits[g, r], labels=y_test[s])}
                flips = data["flipped"][r] & in_pool[r]
                if bool(flips.any()):
                    row["memorised"] = float((train_logits[g, r, flips].argmax(-1) == data["labels"][r, flips])
                                             .double().mean())
                per_seed.append(row)
        main_runs = [r for r, c in enumerate(conditions) if c == MAIN]
        dro_shares = {}
        for g, label in enumerate(labels):
            ball = next((b for b, short in DRO_BALLS.values() if label.startswith(short + "(")), None)
            if ball is None:
                continue
            shares, noise = [], []
            for r in main_runs:
                with torch.no_grad():
                    ce = comp_sum_loss(logits=train_logits[g, r], labels=data["labels"][r], reduction="none")
                w = batch_weights(ball, ce[None])[0]
                shares.append(float(w[data["flipped"][r]].sum()))
                noise.append(float(data["flipped"][r].double().mean()))
            dro_shares[label] = (float(np.mean(shares)), float(np.mean(noise)))

        features, truth = cluster_features()
        cluster_rows, gap = depict_panel(features, truth, seeds, CLUSTER_STEPS, tick)

        test_size = int(x_test.shape[1])
        class_size = int(min(int((y_test[0] == c).sum()) for c in range(CLASSES)))
        recs = recommendations(per_seed, labels, test_size, class_size, cluster_rows, self.name)
        rows = decide.aggregate(per_seed, keys=["divergence", "condition"], metrics=list(METRICS))
        rows += decide.aggregate(cluster_rows, keys=["divergence", "condition"], metrics=["nmi", "cluster_acc"])
        finding = _finding(recs, per_seed, len(seeds))
        notes = _notes(per_seed, labels, curves, data, aldr, dro_shares, cluster_rows, gap) + notes + tie_notes(recs)

        tail_sizes = [int(data["sizes"][r]) for r, c in enumerate(conditions) if c == TAIL]
        counts = np.mean([[int((data["labels"][r, data["pools"][r, : int(data["sizes"][r])]] == c).sum())
                           for c in data["orders"][seeds[int(data['seed_of'][r])]]]
                          for r, c in enumerate(conditions) if c == TAIL], axis=0)
        _plot_noise(out_dir / "noise.png", per_seed, labels,
                    f"Digits with symmetric label noise, {len(seeds)} seeds (mean ± sd)\n"
                    f"at {MAIN_NOISE:.0%}: {' = '.join(recs[0]['best'])} most accurate")
        _plot_tail(out_dir / "long_tail.png", per_seed, labels, data["orders"], counts,
                   f"Long-tailed training ({IMBALANCE:g}:1): test accuracy per class, mean over {len(seeds)} seeds\n"
                   f"worst class: {' = '.join(recs[1]['best'])} best")
        _plot_curves(out_dir / "curves.png", curves, labels, main_runs,
                     f"Clean test accuracy during training with {MAIN_NOISE:.0%} wrong labels (mean ± sd)")
        _plot_clustering(out_dir / "clustering.png", cluster_rows,
                         f"Clustering digits (PCA-{PCA_COMPONENTS}), {len(seeds)} seeds: "
                         f"{' = '.join(recs[4]['best'])} best by NMI")
        figures = [
            Figure(f"{out_dir.name}/noise.png", "Accuracy, worst class and calibration against the noise rate",
                   "One line per objective: clean test accuracy, worst-class test accuracy and ECE of the 64-32-10 MLP "
                   f"trained on labels with {min(NOISE_RATES):.0%}-{max(NOISE_RATES):.0%} symmetric noise, mean over "
                   "seeds with a ± sd band."),
            Figure(f"{out_dir.name}/long_tail.png", "Per-class accuracy after long-tailed training",
                   "Test accuracy of each class, classes ordered by how many training images they kept "
                   f"({IMBALANCE:g}:1 from the first to the last; the mean count is under each rank), mean over seeds."),
            Figure(f"{out_dir.name}/curves.png", "Test accuracy during training with noisy labels",
                   f"Clean test accuracy every {max(1, steps // CURVE_POINTS)} steps at {MAIN_NOISE:.0%} label noise, "
                   "mean over seeds with a ± sd band: a loss that fits the wrong labels rises, then falls."),
            Figure(f"{out_dir.name}/clustering.png", "Clustering panel: DEPICT targets against k-means",
                   "NMI and best-matching accuracy of k-means and of a linear softmax head trained by DEPICT's "
                   "alternating schedule with each target (exact, sqrt, dec), from the k-means head (plain bars) and "
                   "from a random head (hatched); bars: mean ± sd, dots: seeds."),
        ]
        ctx.progress(total, total, "training steps")
        return StudyResult(
            name=self.name, title=self.title, finding=finding, columns=COLUMNS, rows=rows, figures=figures,
            recommendations=recs, notes=notes, seeds=seeds, units=dict(UNITS),
            config={
                "dataset": "sklearn.datasets.load_digits (1797 x 64, 10 classes), standardised with train statistics",
                "split": "stratified 70%/30% train/test, random_state=seed; test labels clean and balanced",
                "seed_varies": "the split, the noise draw, the long-tail subsample and class order, the network's "
                "initialisation and the minibatches (every objective of a condition and seed shares all of them)",
                "conditions": [condition_label(kind, rate) for kind, rate in CONDITIONS],
                "noise": "symmetric: a label is replaced with probability rate by one of the other classes, uniformly; "
                "nested across rates",
                "imbalance": IMBALANCE, "long_tail_train_sizes": tail_sizes, "train_size": n_train,
                "test_size": test_size, "model": f"MLP 64-{HIDDEN}-10 (ReLU), initialised from the seed",
                "training": f"Adam lr {LR}, betas {ADAM_BETAS}, minibatches of {BATCH} (with replacement, seed + "
                f"{BATCH_SEED_OFFSET}), all runs batched", "steps": steps,
                "objectives": labels, "gce_q": GCE_Q, "ldr_lams": list(LDR_LAMS), "ldr_margin": LDR_MARGIN,
                "aldr": {"lam0": ALDR_LAM0, "alpha": ALDR_ALPHA, "margin": LDR_MARGIN},
                "dro": f"cross-entropy weighted within each minibatch by the detached worst case of a ball around the "
                f"uniform weights, lam (r for KL) {DRO_LAM:g}",
                "divergences": [[n, p] for n, p in ctx.divergences], "ece_bins": ECE_BINS,
                "clustering": {
                    "features": f"PCA ({PCA_COMPONENTS} components) of the standardised pixels of all 1797 digits",
                    "kmeans": "sklearn KMeans, 10 clusters, n_init 1, random_state=seed",
                    "depict": f"linear softmax head, {CLUSTER_STEPS} full-batch Adam steps, target refreshed every "
                    f"{REFRESH_EVERY}", "lr": CLUSTER_LR, "random_head_std": RANDOM_HEAD_STD,
                    "exact_vs_sqrt_target_tv": gap,
                },
                "device": str(device), "seconds_measured": round(time.perf_counter() - start, 2),
                "per_seed_rows": per_seed + cluster_rows,
            },
        )


__all__ = ["RobustStudy", "cluster_accuracy", "cluster_features", "make_conditions", "objectives", "train"]
