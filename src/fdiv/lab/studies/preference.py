r"""Study ``preference``: which divergence should regularise preference optimisation?

A contextual bandit stands in for an LLM: ``CONTEXTS`` prompts, ``RESPONSES``
candidate answers each, a reference policy ``pi_ref(y | x)`` (seeded random
logits) and a hidden true reward ``r(x, y)``. A finite preference data set is
drawn the way DPO data is: two responses from ``pi_ref`` per pair, the winner by
the Bradley–Terry model ``P(y1 > y2) = sigmoid(r(y1) - r(y2))``. A tabular policy
starts at the reference and is trained with f-DPO
(:func:`fdiv.objectives.preference.fdpo_loss`, Wang et al., ICLR'24) for each
selected divergence and each ``beta``; ``reverse_kl`` is plain DPO. Two regimes:

* ``population``: the minimiser of the expected f-DPO loss over every ordered
  pair, weighted by ``pi_ref(y1) pi_ref(y2) sigmoid(r(y1) - r(y2))`` (the
  infinite-data limit), on a dense ``beta`` grid. By the f-DPO theorem it is the
  optimum of ``max E_pi[r] - beta D_f(pi || pi_ref)``, where ``r - beta g'(pi / pi_ref)``
  is constant per prompt; it is computed from that condition (gradient methods
  crawl here: the forward-KL and Hellinger losses are very flat at small beta),
  and the tests check that the population loss is stationary there and equals
  the Bradley–Terry label entropy. Divergences are compared at a **matched drift**:
  each one's reward-versus-``KL(pi || pi_ref)`` frontier is interpolated at the
  budget ``KL_BUDGET`` (the beta that reaches it differs per divergence).
* ``sampled``: ``PAIRS_PER_CONTEXT`` sampled pairs per prompt and a fixed Adam
  budget, as in practice, at the ``SAMPLED_BETAS``. Pairs seen in one direction
  only have no finite optimum, and responses absent from the data are moved only
  through the softmax normaliser, so beta no longer bounds the drift.

Each policy is scored exactly (no sampling): the expected true reward,
``KL(pi || pi_ref)`` (the RLHF budget, fdiv's ``reverse_kl`` with P = reference),
``KL(pi_ref || pi)`` (mass lost from the reference's support), the entropy, the
number of responses per prompt that keep at least 1 % of the mass and, in the
sampled regime, the mass on responses that never appear in the prompt's pairs.

**Seeds.** Each seed draws a new bandit (reference policy, true reward) and a new
preference sample; every divergence sees the same bandit and data under a seed, so
comparisons are paired by seed. The population numbers are exact given the bandit:
their spread is the spread over bandits. **One tensor program**: all seeds and betas
of one divergence are solved (population) or trained (sampled: one Adam over stacked
``[seeds, betas, prompts, responses]`` logits, element-wise, so every run trains as it
would alone) together.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.lines import Line2D

from ...math import registry
from ...math.base import Divergence
from ...objectives.preference import fdpo_admissibility, fdpo_loss, fdpo_score
from .. import decide, plotting
from ..optim import Adam
from ..study import BuiltinStudy, Figure, StudyContext, StudyResult, divergence_label, register_study

CONTEXTS = 16
RESPONSES = 10
PAIRS_PER_CONTEXT = 24
REFERENCE_SCALE = 1.2  # std of the reference logits
#: The dense grid of the population frontier (log-spaced; interpolated at the drift budget).
POPULATION_BETAS = tuple(float(f"{b:.3g}") for b in np.geomspace(0.01, 10.0, 16))
SAMPLED_BETAS = (0.1, 0.3, 1.0)
KL_BUDGET = 1.0  # nats of KL(pi || pi_ref): the matched drift of the comparison
REWARD_FRACTION = 0.5  # "matched reward": the policy has gained this fraction of (best response - reference)
LR = 0.1
ADAM_BETAS = (0.9, 0.99)
KEEP_THRESHOLD = 0.01  # a response counts as kept when the policy gives it >= 1% of the prompt's mass
DTYPE = torch.float64
#: Ties below these differences whatever the seeds say (1 % of the attainable reward gain; 0.01 nats).
RESOLUTION = {"reward_gain": 0.01, "entropy": 0.01}

REGIMES = ("population", "sampled")
POPULATION = f"population, KL = {KL_BUDGET:g} nat"
METRICS = ("beta", "reward_gain", "reward", "kl_policy_ref", "kl_ref_policy", "entropy", "kept", "off_data",
           "entropy_at_matched_reward")
COLUMNS = ["regime", "beta", "reward_gain", "kl_policy_ref", "kl_ref_policy", "entropy", "kept", "off_data"]
UNITS = {
    "regime": f"'{POPULATION}': the infinite-data optimum (the minimiser of the expected loss over all "
    f"Bradley-Terry pairs) on each divergence's beta frontier, interpolated where KL(pi || pi_ref) = {KL_BUDGET:g} "
    f"nat; 'sampled': {PAIRS_PER_CONTEXT} pairs per prompt, Adam from the reference for the step budget",
    "beta": "f-DPO's beta (the regularisation strength); in the population rows the beta that reaches the drift "
    "budget (interpolated on the log-spaced grid)",
    "reward_gain": "share of the attainable reward gain, (E[r] under pi - under pi_ref) / (E[max_y r] - E[r] under "
    "pi_ref): 0 = the reference policy, 1 = always the best response (higher is better; normalised per bandit so that "
    "seeds compare; the raw expected reward is in results.json as 'reward')",
    "kl_policy_ref": "KL(pi || pi_ref) in nats, mean over prompts (the RLHF drift budget)",
    "kl_ref_policy": "KL(pi_ref || pi) in nats, mean over prompts (reference mass the policy dropped)",
    "entropy": "entropy of pi(. | x) in nats, mean over prompts",
    "kept": "responses per prompt with pi >= 1% (of the total)",
    "off_data": "sampled regime: the policy's mass on responses that appear in none of the prompt's pairs "
    "(reference row: the reference's own mass there)",
}
REFERENCE_LABEL = "(reference)"


class _Bandit:
    """One seed's problem: reference policy, true reward, sampled pairs, and every ordered pair's weight."""

    def __init__(self, seed: int, device: torch.device):
        g = torch.Generator().manual_seed(seed)
        self.ref_logits = (REFERENCE_SCALE * torch.randn(CONTEXTS, RESPONSES, generator=g, dtype=DTYPE)).to(device)
        self.reward = torch.randn(CONTEXTS, RESPONSES, generator=g, dtype=DTYPE).to(device)
        self.log_ref = torch.log_softmax(self.ref_logits, dim=-1)
        ref = self.log_ref.exp().cpu()
        contexts = torch.arange(CONTEXTS).repeat_interleave(PAIRS_PER_CONTEXT)
        first = torch.multinomial(ref[contexts], 1, generator=g).squeeze(-1)
        second = torch.multinomial(ref[contexts], 1, generator=g).squeeze(-1)
        keep = first != second  # a tie carries no preference
        contexts, first, second = contexts[keep], first[keep], second[keep]
        r = self.reward.cpu()
        p_first = torch.sigmoid(r[contexts, first] - r[contexts, second])
        first_wins = torch.rand(len(contexts), generator=g, dtype=DTYPE) < p_first
        self.contexts = contexts.to(device)
        self.chosen = torch.where(first_wins, first, second).to(device)
        self.rejected = torch.where(first_wins, second, first).to(device)
        seen = torch.zeros(CONTEXTS, RESPONSES, dtype=torch.bool, device=device)
        seen[self.contexts, self.chosen] = True
        seen[self.contexts, self.rejected] = True
        self.seen = seen  # responses that appear in at least one sampled pair of their prompt
        # Every ordered pair (chosen, rejected), chosen != rejected, weighted by its population frequency.
        c, w, l = torch.meshgrid(*(torch.arange(n) for n in (CONTEXTS, RESPONSES, RESPONSES)), indexing="ij")
        distinct = w != l
        c, w, l = (t[distinct].to(device) for t in (c, w, l))
        ref = self.log_ref.exp()
        weight = ref[c, w] * ref[c, l] * torch.sigmoid(self.reward[c, w] - self.reward[c, l])
        self.population = (c, w, l, weight / weight.sum())

    def minimum_population_loss(self) -> float:
        """The Bradley-Terry label entropy: the population f-DPO loss where beta (s_w - s_l) = r_w - r_l."""
        c, w, l, weight = self.population
        return float((weight * torch.nn.functional.softplus(-(self.reward[c, w] - self.reward[c, l]))).sum())

    @property
    def reference_reward(self) -> float:
        return float((self.log_ref.exp() * self.reward).sum(-1).mean())

    @property
    def best_reward(self) -> float:
        return float(self.reward.max(-1).values.mean())

    def metrics(self, log_pi: torch.Tensor) -> dict:
        """Exact metrics of the policy ``log_pi [CONTEXTS, RESPONSES]`` (log-probabilities), means over prompts."""
        pi = log_pi.exp()
        reverse = registry.get("reverse_kl").from_log_probs(self.log_ref, log_pi)  # KL(pi || pi_ref)
        forward = registry.get("forward_kl").from_log_probs(self.log_ref, log_pi)  # KL(pi_ref || pi)
        entropy = -(pi * log_pi).nan_to_num(0.0).sum(-1)
        reward = float((pi * self.reward).sum(-1).mean())
        return {
            "reward": reward,
            "reward_gain": (reward - self.reference_reward) / (self.best_reward - self.reference_reward),
            "kl_policy_ref": float(reverse.mean()),
            "kl_ref_policy": float(forward.mean()),
            "entropy": float(entropy.mean()),
            "kept": float((pi >= KEEP_THRESHOLD).sum(-1).double().mean()),
            "off_data": float((pi * ~self.seen).sum(-1).mean()),
        }


SCORE_GRID = (-1000.0, 40.0, 104001)  # log-ratio grid on which the score is tabulated and inverted


def optimum_rows(reward: torch.Tensor, log_ref: torch.Tensor, div: Divergence, beta: torch.Tensor) -> torch.Tensor:
    """The infinite-data f-DPO optimum of many independent prompts at once (log-probabilities ``[N, R]``).

    Args:
        reward, log_ref: ``[N, R]`` true rewards and reference log-probabilities, one prompt per row.
        beta: ``[N, 1]`` (or a float) the regularisation strength of each row.

    At the optimum ``beta * s(l(y)) = r(y) - c(x)`` with ``s`` the f-DPO score
    (:func:`fdiv.objectives.preference.fdpo_score`, increasing) and ``c(x)`` fixed by
    ``sum_y pi_ref(y) e^{l(y)} = 1``. ``s`` is tabulated on a log-ratio grid and
    inverted by interpolation; ``c`` is found by bisection on the best response's
    log-ratio. The tests check that the population f-DPO loss is stationary there.
    """
    device = reward.device
    grid = torch.linspace(*SCORE_GRID[:2], SCORE_GRID[2], dtype=DTYPE, device=device)
    table = torch.cummax(fdpo_score(log_ratio=grid, divergence=div), dim=0).values

    def inverse(values: torch.Tensor) -> torch.Tensor:
        index = torch.searchsorted(table, values.contiguous()).clamp(1, len(grid) - 1)
        lo, hi = table[index - 1], table[index]
        frac = ((values - lo) / (hi - lo).clamp_min(1e-300)).clamp(0.0, 1.0)
        return grid[index - 1] + frac * (grid[index] - grid[index - 1])

    best = reward.argmax(-1, keepdim=True)
    gap = (reward.gather(-1, best) - reward) / beta  # >= 0
    low = torch.zeros(reward.shape[0], 1, dtype=DTYPE, device=device)  # mass <= 1 when every l <= 0
    high = -log_ref.gather(-1, best)  # the best response alone carries mass 1
    for _ in range(80):
        mid = 0.5 * (low + high)
        log_ratio = inverse(torch.clamp(fdpo_score(log_ratio=mid, divergence=div) - gap, min=table[0]))
        log_ratio = torch.minimum(log_ratio, mid)
        too_much = torch.logsumexp(log_ref + log_ratio, dim=-1, keepdim=True) > 0
        high = torch.where(too_much, mid, high)
        low = torch.where(too_much, low, mid)
    return torch.log_softmax(log_ref + log_ratio, dim=-1)


def _optimum(bandit: _Bandit, div: Divergence, beta: float) -> torch.Tensor:
    """The infinite-data f-DPO optimum of one bandit ``[CONTEXTS, RESPONSES]`` (log-probabilities)."""
    return optimum_rows(bandit.reward, bandit.log_ref, div, beta)


def population_frontier(bandits: list[_Bandit], div: Divergence, betas) -> torch.Tensor:
    """``[seeds, betas, CONTEXTS, RESPONSES]`` optima of every bandit at every beta, solved as one batch."""
    s, b = len(bandits), len(betas)
    reward = torch.stack([x.reward for x in bandits])[:, None].expand(s, b, CONTEXTS, RESPONSES)
    log_ref = torch.stack([x.log_ref for x in bandits])[:, None].expand(s, b, CONTEXTS, RESPONSES)
    beta = torch.tensor(betas, dtype=DTYPE, device=reward.device).view(1, b, 1, 1).expand(s, b, CONTEXTS, 1)
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    return optimum_rows(flat(reward), flat(log_ref), div, flat(beta)).view(s, b, CONTEXTS, RESPONSES)


def _pair_losses(bandit: _Bandit, log_pi: torch.Tensor, pairs, div: Divergence, beta: float) -> torch.Tensor:
    """Per-pair f-DPO losses of the policy ``log_pi`` on ``pairs = (contexts, chosen, rejected)``."""
    contexts, chosen, rejected = pairs
    return fdpo_loss(
        policy_chosen_logps=log_pi[contexts, chosen], policy_rejected_logps=log_pi[contexts, rejected],
        reference_chosen_logps=bandit.log_ref[contexts, chosen],
        reference_rejected_logps=bandit.log_ref[contexts, rejected],
        divergence=div, beta=beta,
    )


def _population_loss(bandit: _Bandit, log_pi: torch.Tensor, div: Divergence, beta: float) -> torch.Tensor:
    """Expected f-DPO loss over all Bradley-Terry pairs."""
    *pairs, weights = bandit.population
    return (weights * _pair_losses(bandit, log_pi, pairs, div, beta)).sum()


class _Pairs:
    """The sampled pairs of several bandits, flattened, with each pair's seed index and weight 1 / n_seed."""

    def __init__(self, bandits: list[_Bandit]):
        cat = lambda f: torch.cat([f(b) for b in bandits])  # noqa: E731
        device = bandits[0].reward.device
        self.seed = torch.cat([torch.full_like(b.contexts, i) for i, b in enumerate(bandits)])
        self.contexts, self.chosen, self.rejected = cat(lambda b: b.contexts), cat(lambda b: b.chosen), cat(
            lambda b: b.rejected)
        counts = torch.tensor([len(b.contexts) for b in bandits], dtype=DTYPE, device=device)
        self.weight = 1.0 / counts[self.seed]
        log_ref = torch.stack([b.log_ref for b in bandits])
        self.ref_chosen = log_ref[self.seed, self.contexts, self.chosen]
        self.ref_rejected = log_ref[self.seed, self.contexts, self.rejected]
        self.seeds = len(bandits)

    def losses(self, log_pi: torch.Tensor, div: Divergence, beta: float) -> torch.Tensor:
        """Per-pair f-DPO losses of the policies ``log_pi [seeds, CONTEXTS, RESPONSES]``."""
        return fdpo_loss(
            policy_chosen_logps=log_pi[self.seed, self.contexts, self.chosen],
            policy_rejected_logps=log_pi[self.seed, self.contexts, self.rejected],
            reference_chosen_logps=self.ref_chosen, reference_rejected_logps=self.ref_rejected,
            divergence=div, beta=beta,
        )

    def mean_per_seed(self, losses: torch.Tensor) -> torch.Tensor:
        """``[seeds]`` the mean loss over each seed's pairs."""
        return torch.zeros(self.seeds, dtype=losses.dtype, device=losses.device).index_add_(
            0, self.seed, losses * self.weight)


def train_sampled(bandits: list[_Bandit], div: Divergence, betas, steps: int, tick=lambda: None):
    """Adam from the reference on each bandit's sampled pairs, for every beta at once.

    Returns ``(log_pi [seeds, betas, CONTEXTS, RESPONSES], final_loss [seeds, betas])``. The objective summed
    over runs gives each run the gradient of its own mean pair loss; Adam is element-wise, so each run trains
    exactly as it would alone.
    """
    pairs = _Pairs(bandits)
    logits = torch.stack([b.ref_logits for b in bandits])[:, None].repeat(1, len(betas), 1, 1).requires_grad_(True)
    optimiser = Adam([logits], [LR], betas=ADAM_BETAS)

    def per_run(log_pi: torch.Tensor) -> torch.Tensor:  # [seeds, betas]
        return torch.stack([pairs.mean_per_seed(pairs.losses(log_pi[:, i], div, beta))
                            for i, beta in enumerate(betas)], 1)

    for _ in range(steps):
        optimiser.zero_grad()
        per_run(torch.log_softmax(logits, dim=-1)).sum().backward()
        optimiser.step()
        tick()
    with torch.no_grad():
        log_pi = torch.log_softmax(logits, dim=-1)
        return log_pi, per_run(log_pi)


def reset_off_data(bandits: list[_Bandit], log_pi: torch.Tensor) -> torch.Tensor:
    """``log_pi [seeds, ..., C, R]`` with the logits of the responses absent from each seed's pairs put back at
    the reference's (relative to the prompt's seen responses), renormalised: the policy without its drift onto
    responses the data never showed. The loss on the data changes only through the normaliser."""
    out = []
    for index, bandit in enumerate(bandits):
        mine = log_pi[index]
        seen = bandit.seen.expand_as(mine)
        # shift the reference logits so that the seen responses keep their policy log-probabilities
        shift = torch.logsumexp(mine.masked_fill(~seen, -math.inf), -1, keepdim=True) - torch.logsumexp(
            bandit.log_ref.masked_fill(~bandit.seen, -math.inf), -1, keepdim=True)
        out.append(torch.log_softmax(torch.where(seen, mine, bandit.log_ref + shift), -1))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------- frontier
def interpolate(x, y, at: float) -> float:
    """``y`` at ``x = at`` by linear interpolation along the points ``(x_i, y_i)`` sorted by ``x``; NaN outside."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    order = np.argsort(x)
    return float(np.interp(at, x[order], y[order], left=np.nan, right=np.nan))


def at_budget(frontier: list[dict], budget: float = KL_BUDGET) -> dict:
    """One seed's population frontier (a row per beta) at ``KL(pi || pi_ref) = budget``: each metric interpolated
    linearly in the KL, ``beta`` geometrically (linear in log beta)."""
    kl = [r["kl_policy_ref"] for r in frontier]
    out = {m: interpolate(kl, [r[m] for r in frontier], budget)
           for m in ("reward_gain", "reward", "kl_ref_policy", "entropy", "kept")}
    out["beta"] = math.exp(interpolate(kl, [math.log(r["beta"]) for r in frontier], budget))
    out["kl_policy_ref"] = budget if math.isfinite(out["reward_gain"]) else math.nan
    return out


def entropy_at_gain(frontier: list[dict], gain: float = REWARD_FRACTION) -> float:
    """One seed's population frontier's entropy where its ``reward_gain`` equals ``gain`` (linear in the gain)."""
    return interpolate([r["reward_gain"] for r in frontier], [r["entropy"] for r in frontier], gain)


def _check_supported(div: Divergence) -> str | None:
    """None if f-DPO accepts the divergence, else the reason it refuses (shown in the row)."""
    verdict = fdpo_admissibility(div)
    return None if verdict.admissible else verdict.reason.split("\n")[0]


# --------------------------------------------------------------------------------------------- decision
GOALS = {
    "budget": f"reward at a fixed drift budget (KL(pi || pi_ref) = {KL_BUDGET:g} nat, unlimited data)",
    "sampled": f"highest reward with finite data ({PAIRS_PER_CONTEXT} sampled pairs per prompt)",
    "diverse": "keep the policy diverse at matched reward (unlimited data)",
}


def recommendations(per_seed: list[dict], study: str = "preference") -> list[dict]:
    """The three goals, decided by :func:`fdiv.lab.decide.recommend` on per-seed values (paired by seed)."""
    recs = []
    budget = decide.samples_by(per_seed, metric="reward_gain", where={"regime": POPULATION})
    if budget:
        recs.append(decide.recommend(
            goal=GOALS["budget"], metric=f"reward_gain at KL(pi || pi_ref) = {KL_BUDGET:g} nat", samples=budget,
            higher_is_better=True, study=study, resolution=RESOLUTION["reward_gain"],
            caveat="circular for reverse_kl: at a fixed KL(pi || pi_ref) the most rewarding policy is exactly the "
            "reverse-KL (DPO) optimum pi_ref exp(r / beta) / Z, so reverse_kl wins by construction and the others "
            "show what they give up. Each divergence's beta frontier is interpolated at the budget (the beta differs: "
            "see the beta column); one beta for all, or reward per nat, would favour whichever moved least",
        ).to_json())
    sampled: dict[str, list[float]] = {}
    for row in per_seed:
        if row["regime"] == "sampled":
            best = sampled.setdefault(row["divergence"], {})
            best[row["seed"]] = max(best.get(row["seed"], -math.inf), row["reward_gain"])
    if sampled:
        recs.append(decide.recommend(
            goal=GOALS["sampled"], metric="reward_gain at the best beta of the sweep", study=study,
            samples={label: list(by_seed.values()) for label, by_seed in sampled.items()},
            higher_is_better=True, resolution=RESOLUTION["reward_gain"],
            caveat=f"each divergence at its best beta of {', '.join(f'{b:g}' for b in SAMPLED_BETAS)} per seed, "
            "chosen on the true reward (oracle tuning); the drift is not matched here",
        ).to_json())
    diverse = decide.samples_by(per_seed, metric="entropy_at_matched_reward", where={"regime": POPULATION})
    if diverse:
        recs.append(decide.recommend(
            goal=GOALS["diverse"], metric="policy entropy (nats) where the reward has gained "
            f"{REWARD_FRACTION:.0%} of the attainable gain", samples=diverse, higher_is_better=True,
            study=study, resolution=RESOLUTION["entropy"], unit="nats",
            caveat="entropy interpolated along each divergence's beta frontier at that reward",
        ).to_json())
    return recs


def _notes(per_seed: list[dict], displaced: dict, labels: list[str], seeds: list[int]) -> list[str]:
    """The JS anomaly (mass pushed off the data) with this run's numbers."""
    sampled = [r for r in per_seed if r["regime"] == "sampled"]
    if not sampled:
        return []
    reference = decide.mean_sd([r["off_data"] for r in per_seed if r["divergence"] == REFERENCE_LABEL])[0]
    off = {label: decide.mean_sd([r["off_data"] for r in sampled if r["divergence"] == label])[0]
           for label in labels if any(r["divergence"] == label for r in sampled)}
    gain = {label: decide.mean_sd([r["reward_gain"] for r in sampled if r["divergence"] == label])[0] for label in off}
    below = {label: sum(r["reward"] < ref["reward"] for r in sampled if r["divergence"] == label for ref in per_seed
                        if ref["divergence"] == REFERENCE_LABEL and ref["seed"] == r["seed"]) for label in off}
    runs = {label: sum(r["divergence"] == label for r in sampled) for label in off}
    if not off:
        return []
    worst = max(off, key=off.get)
    text = ", ".join(f"{label} {value:.0%}" for label, value in sorted(off.items(), key=lambda kv: -kv[1]))
    note = (
        f"Where the mass goes with finite data: share of the policy on responses absent from the sampled pairs, mean "
        f"over seeds and betas: {text} (the reference: {reference:.0%}). {worst} has the largest; its sampled reward "
        f"gain averages {gain[worst]:.2f} (0 = the reference) and {below[worst]} of its {runs[worst]} runs end below "
        "the reference's reward. "
    )
    if worst in displaced:
        before, after = displaced[worst]
        verb = "raises" if after > before else "does not raise"
        note += (
            f"Putting those responses back at their reference share {verb} {worst}'s final loss on the data "
            f"({before:.4f} -> {after:.4f}, mean over seeds and betas)"
            + (": the data loss itself prefers the displaced policy. " if after > before else ". ")
        )
    if worst.split("(")[0] == "js":
        note += (
            "Real, not a bug: fdiv's js score is exactly (log sigmoid(l) + log 2) / 2, l = log(pi / pi_ref) (a "
            "test checks it), bounded above by log(2)/2 and only linear below, so a chosen response's implied "
            "reward saturates and the loss keeps falling only by pushing rejected responses down, slowly. "
        )
    note += (
        "Every f-DPO score but DPO's depends on the absolute log-ratio, so pushing seen responses down through the "
        "softmax lifts every response the data never shows, and Adam moves those tiny-gradient logits at full step "
        "size; DPO's (reverse_kl) loss depends only on chosen-minus-rejected log-ratios and leaves absent responses "
        "alone. The absent responses' reward is whatever the bandit gave them, so a policy that moved there has a "
        "reward that varies with the seed and can end below the reference's. With unlimited data no response is "
        "absent, and every divergence reaches a similar reward at matched drift."
    )
    return [note]


def _finding(recs: list[dict], per_seed: list[dict], seeds: int) -> tuple[str, str]:
    by_goal = {r["goal"]: r for r in recs}
    budget, sampled, diverse = (by_goal.get(GOALS[k]) for k in ("budget", "sampled", "diverse"))
    if budget is None:
        return "No selected divergence is usable with f-DPO (see the rows for the reasons).", "No usable divergence"
    def show(rec, k):
        v = rec["values"][k]
        return f"{k} {v['mean']:.2f}" + (f" ± {v['sd']:.2f}" if v["n"] > 1 else "")

    means = {k: v["mean"] for k, v in budget["values"].items()}
    low, high = min(means, key=means.get), max(means, key=means.get)
    finding = (
        f"With unlimited preference data, at a drift of KL(pi || pi_ref) = {KL_BUDGET:g} nat the divergences reach "
        f"{means[low]:.2f} ({low}) to {means[high]:.2f} ({high}) of the attainable reward gain; best "
        f"{' = '.join(budget['best'])}"
        + (" (optimal by construction at a KL(pi || pi_ref) budget)" if budget["best"][0] == "reverse_kl" else "")
    )
    if diverse:
        lead = diverse["values"][diverse["best"][0]]
        spread = f" ± {lead['sd']:.2f}" if lead["n"] > 1 else ""
        finding += (f", most diverse at matched reward {' = '.join(diverse['best'])} (entropy {lead['mean']:.2f}"
                    f"{spread} nats)")
    finding += "."
    if sampled:
        worst = min(sampled["values"], key=lambda k: sampled["values"][k]["mean"])
        finding += (
            f" With {PAIRS_PER_CONTEXT} sampled pairs per prompt (best beta each): "
            f"{'tie ' if len(sampled['best']) > 1 else ''}{', '.join(show(sampled, k) for k in sampled['best'])}; "
            f"last {show(sampled, worst)}."
        )
    finding += f" Mean ± sd over {seeds} bandit{'s' if seeds > 1 else ''}; ties are within the paired uncertainty."
    title = f"At {KL_BUDGET:g} nat of drift: {' = '.join(budget['best'])}" + (
        f"; finite data: {' = '.join(sampled['best'])}" if sampled else "")
    return finding, title


BETA_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _plot_frontier(path, curves, rows, labels, ref, targets, title):
    """Three panels: population reward gain vs drift, population entropy vs gain, sampled gain vs drift."""
    fig, axes = plotting.new_figure(17.5, 4.8, ncols=3)
    left, middle, right = axes
    for label in labels:
        if label not in curves:
            continue
        colour = plotting.colour_for(label)
        curve = curves[label]  # mean over seeds at each beta of the grid
        left.plot(curve["kl_policy_ref"], curve["reward_gain"], "-", color=colour, label=label, linewidth=1.8)
        middle.plot(curve["reward_gain"], curve["entropy"], "-", color=colour, label=label, linewidth=1.8)
        row = next((r for r in rows if r["divergence"] == label and r["regime"] == POPULATION), None)
        if row is not None and math.isfinite(row["reward_gain"]):
            left.errorbar(KL_BUDGET, row["reward_gain"], yerr=row.get("reward_gain_sd", 0.0), color=colour,
                          marker="o", markeredgecolor="black", markeredgewidth=0.5, capsize=3, zorder=4)
        if label in targets:
            mean, sd = targets[label]
            middle.errorbar(REWARD_FRACTION, mean, yerr=sd, color=colour, marker="o", markeredgecolor="black",
                            markeredgewidth=0.5, capsize=3, zorder=4)
        sampled = sorted((r for r in rows if r["divergence"] == label and r["regime"] == "sampled"),
                         key=lambda r: r["beta"])
        if sampled:
            right.plot([r["kl_policy_ref"] for r in sampled], [r["reward_gain"] for r in sampled], "-",
                       color=colour, linewidth=0.8, alpha=0.6)
        for r in sampled:
            shape = BETA_MARKERS[SAMPLED_BETAS.index(r["beta"]) % len(BETA_MARKERS)]
            right.errorbar(r["kl_policy_ref"], r["reward_gain"], xerr=r.get("kl_policy_ref_sd", 0.0),
                           yerr=r.get("reward_gain_sd", 0.0), color=colour, marker=shape, markersize=7,
                           markeredgecolor="black", markeredgewidth=0.5, capsize=2, linestyle="none", zorder=3)
    for ax in (left, right):
        ax.scatter([0.0], [0.0], marker="*", s=220, color="gold", edgecolor="black", zorder=5)
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
        ax.set_xlabel("drift KL(pi || pi_ref) (nats, mean over prompts)")
        ax.set_ylabel("share of the attainable reward gain")
    left.axvline(KL_BUDGET, color=plotting.NEUTRAL, linestyle="--", linewidth=1)
    middle.axvline(REWARD_FRACTION, color=plotting.NEUTRAL, linestyle="--", linewidth=1)
    middle.scatter([0.0], [ref["entropy"]], marker="*", s=220, color="gold", edgecolor="black", zorder=5)
    middle.set_xlabel("share of the attainable reward gain")
    middle.set_ylabel("policy entropy (nats)")
    left.set_title(f"unlimited data: reward vs drift (dashed: the {KL_BUDGET:g}-nat budget)", fontsize=9)
    middle.set_title("unlimited data: diversity vs reward (dashed: the matched reward)", fontsize=9)
    right.set_title(f"{PAIRS_PER_CONTEXT} sampled pairs per prompt (marker: beta)", fontsize=9)
    for ax in axes:
        ax.margins(0.06)  # autoscaled on every point, the reference star included (nothing clipped)
        ax.grid(alpha=0.3)
    references = [
        Line2D([], [], color="gold", marker="*", markersize=13, markeredgecolor="black", linestyle="none",
               label="reference policy (gain 0)"),
        Line2D([], [], color="black", linestyle=":", label="always the best response (gain 1)"),
    ]
    left.legend(handles=[*left.get_legend_handles_labels()[0], *references], fontsize=8, loc="lower right")
    middle.legend(fontsize=8, loc="lower left")
    betas = [Line2D([], [], color="white", markeredgecolor="black", marker=BETA_MARKERS[i], linestyle="none",
                    label=f"beta {b:g}") for i, b in enumerate(SAMPLED_BETAS)]
    right.legend(handles=betas + references, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5),
                 frameon=False, title="colours as left", title_fontsize=8)
    plotting.save(fig, path, title)


@register_study
class PreferenceStudy(BuiltinStudy):
    name = "preference"  # title, description and defaults: fdiv.lab.catalog (torch-free, read by --list)

    def execute(self, ctx: StudyContext, steps: int, out) -> StudyResult:
        seeds = list(ctx.seeds)
        bandits = [_Bandit(seed, ctx.device) for seed in seeds]
        usable, rows_status, labels = [], [], []
        for name, params in ctx.divergences:
            label = divergence_label(name, params)
            labels.append(label)
            try:
                # built once: js's own "beta" lives on the instance, apart from f-DPO's beta
                div = registry.get(name, **params)
            except (ValueError, TypeError) as error:
                reason = str(error).splitlines()[0]
                rows_status.append({"divergence": label, "status": f"not usable with f-DPO: {reason}"})
                continue
            refused = _check_supported(div)
            if refused is not None:
                rows_status.append({"divergence": label, "status": f"not usable with f-DPO: {refused}"})
                continue
            usable.append((label, div))
        total = max(1, steps * len(usable))
        unit = (f"training steps (divergences x steps; each step trains {len(seeds)} seeds x {len(SAMPLED_BETAS)} "
                "betas on sampled pairs)")
        tick = ctx.ticker(total, every=max(1, total // 20), unit=unit)

        per_seed = []
        for seed, bandit in zip(seeds, bandits):
            per_seed.append({"divergence": REFERENCE_LABEL, "regime": "-", "seed": seed,
                             **bandit.metrics(bandit.log_ref), "kl_policy_ref": 0.0, "kl_ref_policy": 0.0})
        curves, targets, displaced, final_losses = {}, {}, {}, {}
        for label, div in usable:
            # unlimited data: the exact optimum on the beta grid, every seed at once
            log_pi = population_frontier(bandits, div, POPULATION_BETAS)
            frontiers = [[{"beta": beta, **bandit.metrics(log_pi[s, b])} for b, beta in enumerate(POPULATION_BETAS)]
                         for s, bandit in enumerate(bandits)]
            curves[label] = {m: np.mean([[r[m] for r in f] for f in frontiers], 0)
                             for m in ("kl_policy_ref", "reward_gain", "entropy")}
            matched = []
            for seed, frontier in zip(seeds, frontiers):
                matched.append(entropy_at_gain(frontier))
                per_seed.append({"divergence": label, "regime": POPULATION, "seed": seed, **at_budget(frontier),
                                 "entropy_at_matched_reward": matched[-1]})
            targets[label] = decide.mean_sd(matched)
            # finite data: Adam on the sampled pairs, every seed and beta at once
            if steps > 0:
                log_pi, losses = train_sampled(bandits, div, SAMPLED_BETAS, steps, tick)
                reset = reset_off_data(bandits, log_pi)
                pairs = _Pairs(bandits)
                with torch.no_grad():
                    reset_losses = torch.stack([pairs.mean_per_seed(pairs.losses(reset[:, i], div, beta))
                                                for i, beta in enumerate(SAMPLED_BETAS)], 1)
                displaced[label] = (float(losses.mean()), float(reset_losses.mean()))
                final_losses[label] = float(losses.mean())
                for s, (seed, bandit) in enumerate(zip(seeds, bandits)):
                    for b, beta in enumerate(SAMPLED_BETAS):
                        per_seed.append({"divergence": label, "regime": "sampled", "seed": seed, "beta": beta,
                                         **bandit.metrics(log_pi[s, b])})

        recs = recommendations(per_seed, self.name) if usable else []
        keyed = lambda regime: [r for r in per_seed if r["regime"] == regime]  # noqa: E731
        rows = decide.aggregate(keyed("-"), keys=["divergence", "regime"], metrics=list(METRICS))
        rows += decide.aggregate(keyed(POPULATION), keys=["divergence", "regime"], metrics=list(METRICS))
        rows += decide.aggregate(keyed("sampled"), keys=["divergence", "regime", "beta"],
                                 metrics=[m for m in METRICS if m != "beta"])  # beta is a key here, exact
        for row in rows:
            row.pop("seeds", None)
            for key in [k for k in row if k.endswith("_sd")]:
                if row[key] < 1e-12:  # exact in every seed (the budget itself, the reference's zero drift)
                    del row[key]
        rows = rows + rows_status
        ref_row = rows[0]
        finding, title = _finding(recs, per_seed, len(seeds))
        if usable:
            _plot_frontier(out / "frontier.png", curves, rows, labels, ref_row, targets, title)
        ctx.progress(total, total, unit)
        figures = [
            Figure(
                f"{self.name}/frontier.png",
                "Reward, diversity and drift per divergence",
                "Left: expected true reward of the f-DPO optimum with unlimited preference data against the drift "
                "KL(pi || pi_ref), one line per divergence through its beta grid (mean over seeds at each beta); "
                f"points with error bars: the reward at the {KL_BUDGET:g}-nat budget (mean ± sd over seeds); star: "
                "the reference policy; dotted: always answering the best response. Middle: the same optima's entropy "
                f"against their reward; points: the entropy where the reward has gained {REWARD_FRACTION:.0%} of "
                f"(best - reference). Right: {PAIRS_PER_CONTEXT} sampled pairs per prompt after the Adam budget, one "
                "marker shape per beta, mean ± sd over seeds; beta no longer bounds the drift.",
            )
        ] if usable else []
        population_losses = [b.minimum_population_loss() for b in bandits]
        return StudyResult(
            name=self.name,
            title=self.title,
            finding=finding,
            columns=COLUMNS + (["status"] if rows_status else []),
            rows=rows,
            figures=figures,
            config={
                "steps": steps,
                "seed": ctx.seed,
                "seeds": seeds,
                "seed_varies": "the bandit (reference policy and true reward) and its sampled preference pairs; "
                "every divergence sees the same bandit and pairs under a seed; the policy starts at the reference",
                "contexts": CONTEXTS,
                "responses": RESPONSES,
                "pairs_per_context": PAIRS_PER_CONTEXT,
                "sampled_pairs_after_dropping_ties": [int(b.contexts.numel()) for b in bandits],
                "reference_logit_std": REFERENCE_SCALE,
                "population_betas": list(POPULATION_BETAS),
                "sampled_betas": list(SAMPLED_BETAS),
                "kl_budget_nats": KL_BUDGET,
                "matched_reward": f"reward_gain = {REWARD_FRACTION:g}: reference + {REWARD_FRACTION:g} x "
                "(best response - reference), per seed",
                "resolution": dict(RESOLUTION),
                "optimiser": {
                    "population": "exact minimiser from the f-DPO optimality condition (score tabulated on "
                    f"{SCORE_GRID[2]} log-ratios in [{SCORE_GRID[0]:g}, {SCORE_GRID[1]:g}], 80 bisection steps)",
                    "sampled": f"Adam lr {LR}, betas {ADAM_BETAS}, full batch, {steps} steps",
                    "init": "the reference policy",
                },
                "loss": {
                    "population_at_every_optimum": population_losses,
                    "population_note": "the Bradley-Terry label entropy, the same for every divergence and beta "
                    "(f-DPO theorem), so it is not a column",
                    "sampled_final_mean_over_seeds_and_betas": final_losses,
                },
                "reward": "r(x, y) ~ N(0, 1) from the seed, hidden from training; preferences by Bradley-Terry",
                "keep_threshold": KEEP_THRESHOLD,
                "divergences": [divergence_label(n, p) for n, p in ctx.divergences],
                "device": str(ctx.device),
            },
            units={**UNITS, "status": "why a divergence was not trained (f-DPO's cancellation condition)"},
            recommendations=recs,
            notes=_notes(per_seed, displaced, [label for label, _ in usable], seeds),
            seeds=seeds,
        )
