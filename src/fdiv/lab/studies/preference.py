"""Study ``preference``: which divergence should regularise preference optimisation?

A contextual bandit stands in for an LLM: ``CONTEXTS`` prompts, ``RESPONSES``
candidate answers each, a reference policy ``pi_ref(y | x)`` (seeded random
logits) and a hidden true reward ``r(x, y)``. A finite preference data set is
drawn the way DPO data is: two responses from ``pi_ref`` per pair, the winner by
the Bradley–Terry model ``P(y1 > y2) = sigmoid(r(y1) - r(y2))``. A tabular policy
starts at the reference and is trained with f-DPO
(:func:`fdiv.objectives.preference.fdpo_loss`, Wang et al., ICLR'24) for each
selected divergence and each ``beta`` of a sweep; ``reverse_kl`` is plain DPO.
Two regimes:

* ``population``: the minimiser of the expected f-DPO loss over every ordered
  pair, weighted by ``pi_ref(y1) pi_ref(y2) sigmoid(r(y1) - r(y2))`` (the
  infinite-data limit). By the f-DPO theorem it is the optimum of
  ``max E_pi[r] - beta D_f(pi || pi_ref)``, where ``r - beta g'(pi / pi_ref)`` is
  constant per prompt; it is computed from that condition (gradient methods
  crawl here: the forward-KL and Hellinger losses are very flat at small beta),
  and the tests check that the population loss is stationary there and equals
  the Bradley–Terry label entropy.
* ``sampled``: ``PAIRS_PER_CONTEXT`` sampled pairs per prompt and a fixed Adam
  budget, as in practice. Pairs seen in one direction only have no finite
  optimum, so the policy drifts further than the theory says.

Each trained policy is scored exactly (no sampling): the expected true reward,
``KL(pi || pi_ref)`` (the RLHF budget, fdiv's ``reverse_kl`` with P = reference),
``KL(pi_ref || pi)`` (mass lost from the reference's support), the entropy and
the number of responses per prompt that keep at least 1 % of the mass. The
reward-versus-KL frontier shows which divergence buys the most reward per nat of
drift; the entropy shows which keeps the policy diverse.
"""

from __future__ import annotations

import math

import torch

from ...math import registry
from ...math.base import Divergence
from ...objectives.preference import fdpo_admissibility, fdpo_loss, fdpo_score
from .. import plotting
from ..study import BuiltinStudy, Figure, StudyContext, StudyResult, divergence_label, register_study

CONTEXTS = 16
RESPONSES = 10
PAIRS_PER_CONTEXT = 24
REFERENCE_SCALE = 1.2  # std of the reference logits
BETAS = (0.03, 0.1, 0.3, 1.0)
LR = 0.1
ADAM_BETAS = (0.9, 0.99)
KEEP_THRESHOLD = 0.01  # a response counts as kept when the policy gives it >= 1% of the prompt's mass
DTYPE = torch.float64

REGIMES = ("population", "sampled")
COLUMNS = ["regime", "beta", "reward", "kl_policy_ref", "kl_ref_policy", "entropy", "kept", "train_loss"]
UNITS = {
    "regime": "population: minimiser of the expected loss over all Bradley-Terry pairs (infinite data); sampled: "
    f"{PAIRS_PER_CONTEXT} pairs per prompt, Adam for the step budget",
    "beta": "f-DPO's beta (the regularisation strength)",
    "reward": "expected true reward E_x E_{y~pi}[r(x, y)] (higher is better)",
    "kl_policy_ref": "KL(pi || pi_ref) in nats, mean over prompts (the RLHF drift budget)",
    "kl_ref_policy": "KL(pi_ref || pi) in nats, mean over prompts (reference mass the policy dropped)",
    "entropy": "entropy of pi(. | x) in nats, mean over prompts",
    "kept": "responses per prompt with pi >= 1% (of the total)",
    "train_loss": "final f-DPO loss on the regime's preference data (log 2 at the reference)",
}


class _Bandit:
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

    def metrics(self, log_pi: torch.Tensor) -> dict:
        pi = log_pi.exp()
        ref = self.log_ref.exp()
        reverse = registry.get("reverse_kl").from_log_probs(self.log_ref, log_pi)  # KL(pi || pi_ref)
        forward = registry.get("forward_kl").from_log_probs(self.log_ref, log_pi)  # KL(pi_ref || pi)
        entropy = -(pi * log_pi).nan_to_num(0.0).sum(-1)
        return {
            "reward": float((pi * self.reward).sum(-1).mean()),
            "kl_policy_ref": float(reverse.mean()),
            "kl_ref_policy": float(forward.mean()),
            "entropy": float(entropy.mean()),
            "kept": float((pi >= KEEP_THRESHOLD).sum(-1).double().mean()),
            "_ref_reward": float((ref * self.reward).sum(-1).mean()),
            "_best_reward": float(self.reward.max(-1).values.mean()),
        }


SCORE_GRID = (-1000.0, 40.0, 104001)  # log-ratio grid on which the score is tabulated and inverted


def _optimum(bandit: _Bandit, div: Divergence, beta: float) -> torch.Tensor:
    """The infinite-data f-DPO optimum ``[CONTEXTS, RESPONSES]`` (log-probabilities), from the f-DPO theorem.

    At the optimum ``beta * s(l(y)) = r(y) - c(x)`` with ``s`` the f-DPO score
    (:func:`fdiv.objectives.preference.fdpo_score`, increasing) and ``c(x)`` fixed by
    ``sum_y pi_ref(y) e^{l(y)} = 1``. ``s`` is tabulated on a log-ratio grid and
    inverted by interpolation; ``c`` is found by bisection on the best response's
    log-ratio. The tests check that the population f-DPO loss is stationary there.
    """
    grid = torch.linspace(*SCORE_GRID[:2], SCORE_GRID[2], dtype=DTYPE, device=bandit.reward.device)
    table = torch.cummax(fdpo_score(log_ratio=grid, divergence=div), dim=0).values

    def inverse(values: torch.Tensor) -> torch.Tensor:
        index = torch.searchsorted(table, values.contiguous()).clamp(1, len(grid) - 1)
        lo, hi = table[index - 1], table[index]
        frac = ((values - lo) / (hi - lo).clamp_min(1e-300)).clamp(0.0, 1.0)
        return grid[index - 1] + frac * (grid[index] - grid[index - 1])

    reward, log_ref = bandit.reward, bandit.log_ref
    best = reward.argmax(-1, keepdim=True)
    gap = (reward.gather(-1, best) - reward) / beta  # >= 0
    low = torch.zeros(CONTEXTS, 1, dtype=DTYPE, device=reward.device)  # mass <= 1 when every l <= 0
    high = -log_ref.gather(-1, best)  # the best response alone carries mass 1
    for _ in range(80):
        mid = 0.5 * (low + high)
        log_ratio = inverse(torch.clamp(fdpo_score(log_ratio=mid, divergence=div) - gap, min=table[0]))
        log_ratio = torch.minimum(log_ratio, mid)
        too_much = torch.logsumexp(log_ref + log_ratio, dim=-1, keepdim=True) > 0
        high = torch.where(too_much, mid, high)
        low = torch.where(too_much, low, mid)
    return torch.log_softmax(log_ref + log_ratio, dim=-1)


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


def _train_sampled(bandit: _Bandit, div: Divergence, beta: float, steps: int, tick) -> tuple[torch.Tensor, float]:
    """Adam on the sampled pairs from the reference; the policy's log-probabilities and the final loss."""
    pairs = (bandit.contexts, bandit.chosen, bandit.rejected)
    logits = bandit.ref_logits.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=LR, betas=ADAM_BETAS)

    def loss_value() -> torch.Tensor:
        return _pair_losses(bandit, torch.log_softmax(logits, dim=-1), pairs, div, beta).mean()

    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        loss_value().backward()
        optimiser.step()
        tick()
    with torch.no_grad():
        return torch.log_softmax(logits, dim=-1), float(loss_value())


def _check_supported(div: Divergence) -> str | None:
    """None if f-DPO accepts the divergence, else the reason it refuses (shown in the row)."""
    verdict = fdpo_admissibility(div)
    return None if verdict.admissible else verdict.reason.split("\n")[0]


def _finding(rows: list[dict], ref_reward: float, best_reward: float) -> tuple[str, str]:
    trained = [r for r in rows if "reward" in r and r["regime"] == "population"]
    sampled = [r for r in rows if "reward" in r and r["regime"] == "sampled"]
    if not trained:
        return "No selected divergence is usable with f-DPO (see the rows for the reasons).", "No usable divergence"
    gain = lambda r: (r["reward"] - ref_reward) / max(r["kl_policy_ref"], 1e-12)  # noqa: E731
    best = max(trained, key=lambda r: r["reward"])
    efficient = max(trained, key=gain)
    diverse = max(trained, key=lambda r: r["entropy"])
    finding = (
        f"With unlimited preference data, the highest true reward is {best['divergence']} at beta {best['beta']:g} "
        f"({best['reward']:.3f}; reference {ref_reward:.3f}, best response {best_reward:.3f}; "
        f"KL(pi || pi_ref) {best['kl_policy_ref']:.2f} nats); the most reward per nat of drift is "
        f"{efficient['divergence']} at beta {efficient['beta']:g} ({gain(efficient):.3f} per nat); the most diverse "
        f"policy is {diverse['divergence']} at beta {diverse['beta']:g} (entropy {diverse['entropy']:.2f} nats, "
        f"{diverse['kept']:.1f} responses kept per prompt)."
    )
    if sampled:
        by = {(r["divergence"], r["beta"]): r for r in trained}
        further = [r for r in sampled if (r["divergence"], r["beta"]) in by
                   and r["kl_policy_ref"] > by[(r["divergence"], r["beta"])]["kl_policy_ref"]]
        best_sampled = max(sampled, key=lambda r: r["reward"])
        worst_sampled = min(sampled, key=lambda r: r["reward"])
        finding += (
            f" On {PAIRS_PER_CONTEXT} sampled pairs per prompt, {len(further)} of {len(sampled)} runs drift further "
            f"from the reference than their infinite-data optimum; the best is {best_sampled['divergence']} at beta "
            f"{best_sampled['beta']:g} (reward {best_sampled['reward']:.3f}), the worst {worst_sampled['divergence']} "
            f"at beta {worst_sampled['beta']:g} ({worst_sampled['reward']:.3f}, "
            f"{'below' if worst_sampled['reward'] < ref_reward else 'above'} the reference)."
        )
    title = f"Highest reward: {best['divergence']} (beta {best['beta']:g}); most per nat: {efficient['divergence']}"
    return finding, title


def _plot_frontier(path, rows, labels, ref_reward, best_reward, title):
    fig, axes = plotting.new_figure(15.0, 4.4, ncols=3)
    panels = [("population", "reward", axes[0]), ("population", "entropy", axes[1]), ("sampled", "reward", axes[2])]
    for regime, metric, ax in panels:
        for index, label in enumerate(labels):
            mine = sorted((r for r in rows if r["divergence"] == label and r.get("regime") == regime and "reward" in r),
                          key=lambda r: r["beta"])
            if not mine:
                continue
            ax.plot([r["kl_policy_ref"] for r in mine], [r[metric] for r in mine], "-o", color=plotting.colour(index),
                    label=label)
            if metric == "reward":
                for r in mine:
                    ax.annotate(f"{r['beta']:g}", (r["kl_policy_ref"], r["reward"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        if metric == "reward":
            ax.scatter([0.0], [ref_reward], marker="*", s=160, color="gold", edgecolor="black", zorder=4)
            ax.axhline(ref_reward, color="grey", linestyle="--", linewidth=1, label="reference policy")
            ax.axhline(best_reward, color="black", linestyle=":", linewidth=1, label="best response")
        ax.set_xlabel("KL(pi || pi_ref) (nats, mean over prompts)")
        ax.set_ylabel("expected true reward" if metric == "reward" else "policy entropy (nats)")
        ax.set_title(f"{regime} preferences", fontsize=9)
        ax.set_xlim(left=0.0)
    axes[0].legend(fontsize=8)
    plotting.save(fig, path, title)


@register_study
class PreferenceStudy(BuiltinStudy):
    name = "preference"
    title = "Preference optimisation: f-DPO with each divergence"
    description = (
        "Train a tabular policy on Bradley-Terry preferences over a reference policy's responses with f-DPO under "
        "each divergence and a beta sweep (infinite data and sampled pairs); compare expected true reward, KL from "
        "the reference and entropy."
    )
    default_steps = 300
    default_divergences = ("reverse_kl", "forward_kl", "js", "alpha", "hellinger", "jeffreys")

    def execute(self, ctx: StudyContext, steps: int, out) -> StudyResult:
        bandit = _Bandit(ctx.seed, ctx.device)
        total = steps * len(BETAS) * len(ctx.divergences)
        tick = ctx.ticker(total, every=100)
        reference = bandit.metrics(bandit.log_ref)
        ref_reward, best_reward = reference.pop("_ref_reward"), reference.pop("_best_reward")
        rows = [{"divergence": "(reference)", "regime": "", "beta": 0.0, **reference, "train_loss": math.log(2.0)}]
        labels = []
        for name, params in ctx.divergences:
            label = divergence_label(name, params)
            labels.append(label)
            try:
                # built once: js's own "beta" lives on the instance, apart from f-DPO's beta
                div = registry.get(name, **params)
            except (ValueError, TypeError) as error:
                rows.append({"divergence": label, "status": f"not usable with f-DPO: {str(error).splitlines()[0]}"})
                continue
            refused = _check_supported(div)
            if refused is not None:
                rows.append({"divergence": label, "status": f"not usable with f-DPO: {refused}"})
                continue
            for regime in REGIMES:
                for beta in BETAS:
                    if regime == "population":
                        log_pi = _optimum(bandit, div, beta)
                        loss = float(_population_loss(bandit, log_pi, div, beta))
                    else:
                        log_pi, loss = _train_sampled(bandit, div, beta, steps, tick)
                    metrics = bandit.metrics(log_pi)
                    metrics.pop("_ref_reward"), metrics.pop("_best_reward")
                    rows.append({"divergence": label, "regime": regime, "beta": beta, **metrics, "train_loss": loss})

        finding, title = _finding(rows[1:], ref_reward, best_reward)
        _plot_frontier(out / "frontier.png", rows[1:], labels, ref_reward, best_reward, title)
        ctx.progress(total, total)
        return StudyResult(
            name=self.name,
            title=self.title,
            finding=finding,
            columns=COLUMNS + (["status"] if any("status" in r for r in rows) else []),
            rows=rows,
            figures=[
                Figure(
                    f"{self.name}/frontier.png",
                    "Reward and entropy against drift from the reference",
                    "Left: expected true reward of the f-DPO optimum under infinite preference data against "
                    "KL(pi || pi_ref), one line per divergence, one point per beta (annotated); dashed: the reference "
                    "policy, dotted: always answering the best response. A line above another reaches more reward for "
                    "the same drift. Middle: the policy's entropy at the same points; mass-covering divergences keep "
                    f"more responses alive. Right: the same as the left on {PAIRS_PER_CONTEXT} sampled pairs per "
                    "prompt with a fixed Adam budget, where beta no longer bounds the drift.",
                )
            ],
            config={
                "steps": steps,
                "seed": ctx.seed,
                "contexts": CONTEXTS,
                "responses": RESPONSES,
                "pairs_per_context": PAIRS_PER_CONTEXT,
                "sampled_pairs_after_dropping_ties": int(bandit.contexts.numel()),
                "reference_logit_std": REFERENCE_SCALE,
                "betas": list(BETAS),
                "optimiser": {
                    "population": "exact minimiser from the f-DPO optimality condition (score tabulated on "
                    f"{SCORE_GRID[2]} log-ratios in [{SCORE_GRID[0]:g}, {SCORE_GRID[1]:g}], 80 bisection steps)",
                    "sampled": f"Adam lr {LR}, betas {ADAM_BETAS}, full batch, {steps} steps",
                    "init": "the reference policy",
                },
                "reward": "r(x, y) ~ N(0, 1) from the seed, hidden from training; preferences by Bradley-Terry",
                "keep_threshold": KEEP_THRESHOLD,
                "divergences": [divergence_label(n, p) for n, p in ctx.divergences],
                "device": str(ctx.device),
            },
            units={**UNITS, "status": "why a divergence was not trained (f-DPO's cancellation condition)"},
        )
