"""WSRL's warm-up at the onset of online fine-tuning without retained offline data: a small measurement.

Environment (written here): a slippery chain of ``--states`` states (20); actions left / right, each
reversed with probability ``--slip``; reward 1 on reaching the right end (terminal), 0
otherwise; episodes start at the left end and are cut after ``--episode-len`` steps (a time
limit, bootstrapped). The optimal Q* is computed exactly by value iteration on the known model.

Agent: an ensemble of ``E = 10`` small MLP Q-heads (scalar position in, LayerNorm, one output per
action), trained with ``fdiv.robust.redq_target`` (min over a random 2-subset of the target heads,
no entropy term, next action = greedy on the ensemble minimum, as WSRL's actor takes the min).

Protocol per seed:

1. offline pre-training on ``--offline-size`` transitions of a uniformly random behaviour policy
   from uniformly random states (``--pretrain-steps`` updates);
2. online fine-tuning from the pre-trained network with an **empty** buffer (no offline data
   retained), acting epsilon-greedily on the ensemble minimum, ``UTD = 4`` critic updates per
   environment step once ``fdiv.robust.WarmupGate`` opens: first update after online step
   ``max(K, batch)``. Two arms share the pre-trained network: ``K = 0`` (no warm-up; updates
   still wait for one batch of transitions, as in the released code) and ``K = --warmup``.

Measured (never asserted): the mean absolute error ``|mean_j Q_j(s, a) - Q*(s, a)|`` over all
non-terminal state-action pairs after every update of the first ``--updates`` updates
(its peak and its final value), the largest over-estimation ``max (Q - Q*)``, and the exact
value of the greedy policy from the start state relative to ``V*(start)`` after those updates.
Both arms are compared at the same number of gradient updates; the warm-up arm has taken
``K`` more environment steps.

    python benchmarks/wsrl_warmup.py                 # 5 seeds, under a minute on 2 CPU cores
    python benchmarks/wsrl_warmup.py --seeds 3 --updates 400
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from fdiv.robust import WarmupGate, redq_target


# ============================================================================ environment
class SlipperyChain:
    def __init__(self, n: int, slip: float, gamma: float):
        self.n, self.slip, self.gamma, self.goal = n, slip, gamma, n - 1
        p = np.zeros((n, 2, n))
        for s in range(n):
            for a in range(2):
                step = 1 if a == 1 else -1
                p[s, a, min(max(s + step, 0), n - 1)] += 1 - slip
                p[s, a, min(max(s - step, 0), n - 1)] += slip
        p[self.goal] = 0.0
        p[self.goal, :, self.goal] = 1.0  # absorbing (never bootstrapped: terminal)
        self.p = p

    def step(self, s: int, a: int, rng: np.random.Generator):
        s2 = int(rng.choice(self.n, p=self.p[s, a]))
        reward = 1.0 if s2 == self.goal else 0.0
        return s2, reward, s2 == self.goal

    def optimal_q(self) -> np.ndarray:
        reward = self.p[:, :, self.goal]  # expected reward of (s, a): P(reach goal)
        q = np.zeros((self.n, 2))
        cont = self.p.copy()
        cont[:, :, self.goal] = 0.0  # no bootstrap from the terminal state
        for _ in range(2000):
            q = reward + self.gamma * cont @ q.max(-1)
        q[self.goal] = 0.0
        return q

    def policy_value(self, policy: np.ndarray, start: int = 0) -> float:
        """Exact discounted value of a deterministic policy from ``start`` (linear solve)."""
        n = self.n
        p_pi = self.p[np.arange(n), policy].copy()  # [n, n]
        r_pi = p_pi[:, self.goal].copy()
        p_pi[:, self.goal] = 0.0
        r_pi[self.goal], p_pi[self.goal] = 0.0, 0.0
        v = np.linalg.solve(np.eye(n) - self.gamma * p_pi, r_pi)
        return float(v[start])

    def features(self, s) -> torch.Tensor:
        return torch.as_tensor(np.asarray(s, np.float32) / (self.n - 1) * 2 - 1).reshape(-1, 1)


# ============================================================================ Q ensemble
class QEnsemble(torch.nn.Module):
    """``E`` independent MLPs 1 -> H -> H -> A with LayerNorm, evaluated as one batched matmul."""

    def __init__(self, heads: int, hidden: int, actions: int, generator: torch.Generator):
        super().__init__()

        def init(*shape, fan_in):
            return torch.nn.Parameter(torch.randn(*shape, generator=generator) / fan_in**0.5)

        self.w1, self.b1 = init(heads, 1, hidden, fan_in=1), torch.nn.Parameter(torch.zeros(heads, 1, hidden))
        self.w2, self.b2 = init(heads, hidden, hidden, fan_in=hidden), torch.nn.Parameter(torch.zeros(heads, 1, hidden))
        self.w3, self.b3 = init(heads, hidden, actions, fan_in=hidden), torch.nn.Parameter(torch.zeros(heads, 1, actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1] -> [E, B, A]
        h = x.unsqueeze(0).expand(self.w1.shape[0], -1, -1)
        h = F.relu(F.layer_norm(torch.baddbmm(self.b1, h, self.w1), (self.w1.shape[-1],)))
        h = F.relu(F.layer_norm(torch.baddbmm(self.b2, h, self.w2), (self.w2.shape[-1],)))
        return torch.baddbmm(self.b3, h, self.w3)


class Agent:
    def __init__(self, env: SlipperyChain, args, generator: torch.Generator):
        self.env, self.args, self.gen = env, args, generator
        self.q = QEnsemble(args.heads, args.hidden, 2, generator)
        self.target = copy.deepcopy(self.q)
        self.opt = torch.optim.Adam(self.q.parameters(), lr=args.lr, foreach=True)

    def greedy(self, s) -> np.ndarray:
        with torch.no_grad():
            return self.q(self.env.features(s)).amin(0).argmax(-1).numpy()

    def update(self, batch) -> None:
        s, a, r, s2, done = batch
        x, x2 = self.env.features(s), self.env.features(s2)
        both = self.q(torch.cat([x, x2]))  # one pass for (s, a) and the actor at s'
        q_sa, q_next_online = both[:, : len(a)], both[:, len(a) :].detach()
        with torch.no_grad():
            a2 = q_next_online.amin(0).argmax(-1)  # actor: greedy on the ensemble minimum
            next_q = self.target(x2)[:, torch.arange(len(a2)), a2]  # [E, B]
            y = redq_target(
                next_q_values=next_q,
                rewards=torch.as_tensor(r, dtype=torch.float32),
                dones=torch.as_tensor(done),
                gamma=self.env.gamma,
                subset_size=2,
                generator=self.gen,
            )
        pred = q_sa[:, torch.arange(len(a)), torch.as_tensor(a)]
        loss = ((pred - y) ** 2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.target.parameters()), list(self.q.parameters()), self.args.tau)

    def q_table(self) -> np.ndarray:
        with torch.no_grad():
            return self.q(self.env.features(np.arange(self.env.n))).mean(0).numpy()


# ============================================================================ protocol
def sample(buffer: dict, size: int, rng: np.random.Generator):
    idx = rng.integers(0, len(buffer["s"]), size=size)
    return tuple(np.asarray(buffer[k])[idx] for k in ("s", "a", "r", "s2", "done"))


def pretrain(env, args, seed):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    data = {k: [] for k in ("s", "a", "r", "s2", "done")}
    for _ in range(args.offline_size):
        s = int(rng.integers(0, env.n - 1))
        a = int(rng.integers(0, 2))
        s2, r, done = env.step(s, a, rng)
        for k, v in zip(data, (s, a, r, s2, done)):
            data[k].append(v)
    agent = Agent(env, args, gen)
    for _ in range(args.pretrain_steps):
        agent.update(sample(data, 256, rng))
    return agent


def finetune(pretrained: Agent, env, args, seed, warmup: int, q_star: np.ndarray):
    rng = np.random.default_rng(10_000 + seed)  # same environment randomness in both arms
    agent = copy.deepcopy(pretrained)
    agent.gen = torch.Generator().manual_seed(20_000 + seed)
    agent.opt = torch.optim.Adam(agent.q.parameters(), lr=args.lr, foreach=True)
    gate = WarmupGate(warmup_steps=warmup, batch_size=args.batch)
    buffer = {k: [] for k in ("s", "a", "r", "s2", "done")}
    live = np.arange(env.n) != env.goal
    errors, over = [], []
    s, t_episode = 0, 0
    while len(errors) < args.updates:
        a = int(rng.integers(0, 2)) if rng.random() < args.epsilon else int(agent.greedy([s])[0])
        s2, r, done = env.step(s, a, rng)
        for k, v in zip(buffer, (s, a, r, s2, done)):
            buffer[k].append(v)
        s, t_episode = s2, t_episode + 1
        if done or t_episode >= args.episode_len:
            s, t_episode = 0, 0
        if gate.tick():
            for _ in range(args.utd):
                agent.update(sample(buffer, args.batch, rng))
                diff = agent.q_table()[live] - q_star[live]
                errors.append(float(np.abs(diff).mean()))
                over.append(float(diff.max()))
    policy = agent.greedy(np.arange(env.n))
    return {
        "peak": max(errors),
        "final": errors[-1],
        "over": max(over),
        "ratio": env.policy_value(policy) / env.policy_value(q_star.argmax(-1)),
        "env_steps": gate.steps,
    }


def mean_sd(xs) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--states", type=int, default=20)
    parser.add_argument("--slip", type=float, default=0.2)
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--episode-len", type=int, default=80)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tau", type=float, default=0.02)
    parser.add_argument("--offline-size", type=int, default=4000)
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--utd", type=int, default=4)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    print(f"platform: {platform.platform()} | cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)")
    print(f"python {sys.version.split()[0]} | torch {torch.__version__} | numpy {np.__version__}")
    print(f"command: python benchmarks/wsrl_warmup.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    env = SlipperyChain(args.states, args.slip, args.gamma)
    q_star = env.optimal_q()
    start = time.perf_counter()
    results = {0: [], args.warmup: []}
    onset = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        agent = pretrain(env, args, seed)
        live = np.arange(env.n) != env.goal
        onset.append(float(np.abs(agent.q_table()[live] - q_star[live]).mean()))
        for warmup in results:
            results[warmup].append(finetune(agent, env, args, seed, warmup, q_star))
    elapsed = time.perf_counter() - start

    print(
        f"\nslippery chain: {args.states} states, slip {args.slip}, gamma {args.gamma}; ensemble {args.heads} x MLP({args.hidden}) "
        f"+ LayerNorm; REDQ subset 2; UTD {args.utd}; batch {args.batch}; {args.updates} updates per arm; "
        f"{args.seeds} seeds (mean ± sd)"
    )
    print(f"Q error of the pre-trained ensemble at the onset (both arms): {mean_sd(onset)}\n")
    header = ("arm", "env steps", "peak Q error", "Q error at end", "max over-estimation", "V^pi / V* (start)")
    rows = []
    for warmup, runs in results.items():
        name = "no warm-up (K = 0)" if warmup == 0 else f"warm-up K = {warmup}"
        rows.append(
            (
                name,
                f"{statistics.mean(r['env_steps'] for r in runs):.0f}",
                mean_sd([r["peak"] for r in runs]),
                mean_sd([r["final"] for r in runs]),
                mean_sd([r["over"] for r in runs]),
                mean_sd([r["ratio"] for r in runs]),
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    print(f"\n(Q error = mean |mean_j Q_j(s,a) - Q*(s,a)| over non-terminal pairs; wall time {elapsed:.1f} s)")


if __name__ == "__main__":
    main()
