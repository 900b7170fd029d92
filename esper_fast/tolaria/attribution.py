"""Attribution of a model's live seeds from the metrics of configurations of its slots.

The value function ``f(T)`` is a metric (accuracy in percent, or the mean batch loss) of
the model with the seeds of the set ``T`` as they are and the other live seeds off (alpha
forced to 0). Slots without a live seed (empty, or holding a FOSSILIZED seed, which is part
of the model) stay as they are in every configuration.

Per live slot this gives the Shapley value (exact over all 2^S subsets, or estimated from
antithetic permutation samples with a 95% error bound), the leave-one-out contribution
``f(all) - f(all without i)``, the alone-on contribution ``f({i}) - f({})``, and for every
pair the interaction ``f({i, j}) - f({i}) - f({j}) + f({})``.

The method in three steps, each a function here: :func:`plan_for_slots` (which subsets of
a model's live slots to measure: :func:`plan_attribution`), :func:`subset_configurations`
(the configuration of each subset: the live seeds outside it off), and
:func:`attribution_of` (the values from the measured metrics: :func:`attribute`). The
validation engine (:mod:`esper_fast.tolaria.validation`) measures every configuration in
one pass; a new attribution method is a plan and a value function over the same measured
subsets.

A live seed that cannot change the model's output (GERMINATED, or TRAINING at alpha 0,
where the straight-through estimator passes the host's features unchanged) gives the same
output in every configuration: its Shapley value and contributions are exactly 0, and it is
left out of the subsets (S counts the other live slots), which changes no other value.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Mapping

import torch

from esper_fast.kasmina.configurations import changes_output, configuration_key

__all__ = [
    "MetricAttribution",
    "SlotAttribution",
    "AttributionPlan",
    "plan_attribution",
    "attribute",
    "plan_for_slots",
    "subset_configurations",
    "attribution_of",
]


def _student_t_within(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` degrees of freedom (the closed forms for an
    integer ``df``, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos + 2/3 cos^3 + 2*4/(3*5) cos^5 ...
            total += term
            term *= cos2 * (2 * k) / (2 * k + 1)
        return 2.0 / math.pi * (theta + math.sin(theta) * total)
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # 1 + 1/2 cos^2 + 1*3/(2*4) cos^4 ...
        total += term
        term *= cos2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_quantile_95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (bisection)."""
    low, high = 0.0, 1000.0
    for _ in range(100):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if _student_t_within(middle, df) < 0.95 else (low, middle)
    return 0.5 * (low + high)


@dataclasses.dataclass
class MetricAttribution:
    """One metric's attribution over the live slots (accuracy in percentage points, or loss).

    ``values`` maps each evaluated subset (a frozenset of slot ids, taken from the slots that
    can change the output) to ``f`` of that subset. Per live slot id: ``shapley``, its 95%
    error bound ``shapley_error`` (0.0 when exact), ``leave_one_out`` and ``alone_on``; per
    pair of live slot ids (in host order): ``interactions``.
    """

    values: dict[frozenset, float]
    shapley: dict[str, float]
    shapley_error: dict[str, float]
    leave_one_out: dict[str, float]
    alone_on: dict[str, float]
    interactions: dict[tuple[str, str], float]


@dataclasses.dataclass
class SlotAttribution:
    """Counterfactual attribution of every live slot for one validation pass.

    ``slots``: the live slots, in host order. ``exact``: Shapley values over all subsets
    (else sampled; ``permutations`` is the number of sampled orders, antithetic pairs
    included, 0 when exact). ``accuracy`` and ``loss``: the metrics' attributions.
    """

    slots: tuple[str, ...]
    exact: bool
    permutations: int
    accuracy: MetricAttribution
    loss: MetricAttribution


@dataclasses.dataclass(frozen=True)
class AttributionPlan:
    """Which subsets to evaluate for :func:`attribute`.

    ``slots``: the live slots (host order); ``players``: those whose seed can change the
    output; ``subsets``: every subset of the players to evaluate, the full set first;
    ``orders``: the sampled permutations of the players (indices into ``players``), in
    antithetic pairs (a permutation, then its reverse); empty when exact.
    """

    slots: tuple[str, ...]
    players: tuple[str, ...]
    subsets: tuple[frozenset, ...]
    orders: tuple[tuple[int, ...], ...]

    @property
    def exact(self) -> bool:
        return not self.orders


def plan_attribution(
    slots,
    players,
    *,
    exact_max_slots: int = 4,
    permutations: int = 16,
    generator: torch.Generator | None = None,
) -> AttributionPlan:
    """The subsets that :func:`attribute` needs.

    With at most ``exact_max_slots`` players: all 2^S subsets (exact Shapley values).
    Above: the full set, the empty set, every leave-one-out, alone-on and pair subset, and
    the prefixes of ``permutations`` sampled orders (``permutations // 2`` orders drawn
    with ``torch.randperm`` from ``generator``, each followed by its reverse; default
    generator: a fresh one seeded with 0, so a call is deterministic).

    Raises:
        ValueError: ``permutations`` below 4 when sampling is needed (the error bound needs
            at least two antithetic pairs), or a player that is not a live slot.
    """
    slots, players = tuple(slots), tuple(players)
    if not set(players) <= set(slots):
        raise ValueError(f"plan_attribution: players {players} must be live slots {slots}")
    full = frozenset(players)
    if len(players) <= exact_max_slots:
        subsets = [full] + [
            frozenset(combo) for size in range(len(players) - 1, -1, -1) for combo in itertools.combinations(players, size)
        ]
        return AttributionPlan(slots, players, tuple(subsets), ())
    if permutations < 4:
        raise ValueError(f"plan_attribution: permutations must be at least 4 to bound the error, got {permutations}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(permutations // 2):
        order = tuple(torch.randperm(len(players), generator=generator).tolist())
        orders += [order, order[::-1]]
    wanted = [full, frozenset()]
    wanted += [full - {p} for p in players] + [frozenset({p}) for p in players]
    wanted += [frozenset(pair) for pair in itertools.combinations(players, 2)]
    for order in orders:
        wanted += [frozenset(players[i] for i in order[:k]) for k in range(1, len(order))]
    subsets = tuple(dict.fromkeys(wanted))
    return AttributionPlan(slots, players, subsets, tuple(orders))


def _exact_shapley(players, f: Callable[[frozenset], float]) -> dict[str, float]:
    """sum over T not holding i of |T|! (S - |T| - 1)! / S! * (f(T + i) - f(T))."""
    n = len(players)
    shapley = {}
    for player in players:
        others = [p for p in players if p != player]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for combo in itertools.combinations(others, size):
                subset = frozenset(combo)
                total += weight * (f(subset | {player}) - f(subset))
        shapley[player] = total
    return shapley


def _sampled_shapley(players, orders, f: Callable[[frozenset], float]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean over antithetic pairs of each player's marginal contribution (averaged over the
    pair's two orders), and the 95% half-width of that mean: Student's t quantile for
    ``pairs - 1`` degrees of freedom times the standard error from the sample variance."""
    samples: dict[str, list[float]] = {p: [] for p in players}
    for order, reverse in zip(orders[0::2], orders[1::2]):
        pair = dict.fromkeys(players, 0.0)
        for sequence in (order, reverse):
            before = frozenset()
            for index in sequence:
                player = players[index]
                after = before | {player}
                pair[player] += 0.5 * (f(after) - f(before))
                before = after
        for player in players:
            samples[player].append(pair[player])
    estimate, error = {}, {}
    for player, values in samples.items():
        n = len(values)
        mean = sum(values) / n
        variance = sum((v - mean) ** 2 for v in values) / (n - 1)
        estimate[player] = mean
        error[player] = t_quantile_95(n - 1) * math.sqrt(variance / n)
    return estimate, error


def _metric_attribution(plan: AttributionPlan, values: Mapping[frozenset, float]) -> MetricAttribution:
    values = {subset: float(values[subset]) for subset in plan.subsets}
    f = values.__getitem__
    players, full, empty = plan.players, frozenset(plan.players), frozenset()
    if not players:
        shapley, error = {}, {}
    elif plan.exact:
        shapley, error = _exact_shapley(players, f), dict.fromkeys(players, 0.0)
    else:
        shapley, error = _sampled_shapley(players, plan.orders, f)
    zero = dict.fromkeys(plan.slots, 0.0)
    leave_one_out = {**zero, **{p: f(full) - f(full - {p}) for p in players}}
    alone_on = {**zero, **{p: f(frozenset({p})) - f(empty) for p in players}}
    interactions = {}
    for a, b in itertools.combinations(plan.slots, 2):
        both = a in players and b in players
        interactions[(a, b)] = f(frozenset({a, b})) - f(frozenset({a})) - f(frozenset({b})) + f(empty) if both else 0.0
    return MetricAttribution(
        values=values,
        shapley={**zero, **shapley},
        shapley_error={**zero, **error},
        leave_one_out=leave_one_out,
        alone_on=alone_on,
        interactions=interactions,
    )


def attribute(plan: AttributionPlan, accuracy: Mapping[frozenset, float], loss: Mapping[frozenset, float]) -> SlotAttribution:
    """The attribution from each planned subset's accuracy and loss (``f``), in float64."""
    return SlotAttribution(
        slots=plan.slots,
        exact=plan.exact,
        permutations=len(plan.orders),
        accuracy=_metric_attribution(plan, accuracy),
        loss=_metric_attribution(plan, loss),
    )


def plan_for_slots(slots, exact_max_slots: int = 4, permutations: int = 16, generator=None) -> AttributionPlan | None:
    """The :func:`plan_attribution` of the live slots of ``slots`` (slot id -> SeedSlot, host
    order); None without slots or without a live seed. The players are the live seeds whose
    forced-off output differs from their current one (the others' values are 0)."""
    if slots is None:
        return None
    live = [slot_id for slot_id, slot in slots.items() if slot.is_live]
    if not live:
        return None
    players = [slot_id for slot_id in live if changes_output(slots[slot_id], 0.0)]
    return plan_attribution(live, players, exact_max_slots=exact_max_slots, permutations=permutations, generator=generator)


def subset_configurations(slots, plan: AttributionPlan, configurations: list) -> tuple[dict[frozenset, int], list[dict]]:
    """Each subset of ``plan`` as a configuration of ``slots`` (the players outside it off),
    placed after ``configurations`` (those measured already) unless one with the same
    configuration key is there: ``(position of each subset, the configurations added)``."""
    keys = [configuration_key(slots, configuration) for configuration in configurations]
    positions, added = {}, []
    for subset in plan.subsets:
        configuration = {p: 0.0 for p in plan.players if p not in subset}
        key = configuration_key(slots, configuration)
        if key not in keys:
            keys.append(key)
            added.append(configuration)
        positions[subset] = keys.index(key)
    return positions, added


def attribution_of(plan: AttributionPlan, subsets: Mapping[frozenset, int], results: list) -> SlotAttribution:
    """:func:`attribute` from the measured results (``results[subsets[T]]`` is ``f(T)``'s
    :class:`~esper_fast.ops.MetricsResult`)."""
    accuracy = {subset: float(results[i].accuracy) for subset, i in subsets.items()}
    loss = {subset: float(results[i].loss) for subset, i in subsets.items()}
    return attribute(plan, accuracy, loss)
