"""The per-(rule, series) state machine, without a database: hysteresis, for, keep_firing_for,
no-data, late backlog, out-of-order delivery and idempotence."""

from __future__ import annotations

import dataclasses
import itertools
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.alerts.evaluator import (
    REWIND_SPAN_US,
    Reading,
    State,
    Transition,
    evaluate,
    rewind,
    silence,
    step,
)
from collector.alerts.rules import Rule, RuleError, RuleIndex

S = 1_000_000
TENANT = uuid.UUID(int=1)


def rule(
    condition: str = ">",
    threshold: float = 80.0,
    clear: float | None = None,
    for_s: float = 0,
    keep_s: float = 0,
    no_data_s: float | None = None,
) -> Rule:
    return Rule(
        id=uuid.UUID(int=7),
        tenant_id=TENANT,
        name="hot",
        metric="temperature",
        condition=condition,
        threshold=threshold,
        clear_threshold=threshold if clear is None else clear,
        for_us=int(for_s * S),
        keep_firing_for_us=int(keep_s * S),
        no_data_us=None if no_data_s is None else int(no_data_s * S),
    )


class Series:
    """One series as the collector sees it: stored readings, state, transitions emitted."""

    def __init__(self, r: Rule) -> None:
        self.rule = r
        self.state = State(r.digest)
        self.stored: dict[int, float] = {}
        self.emitted: list[Transition] = []

    def deliver(self, readings: list[Reading]) -> list[Transition]:
        for t, v in readings:
            self.stored.setdefault(t, v)
        outcome = evaluate(self.rule, self.state, readings)
        out = outcome.transitions
        if outcome.rewind_from is not None:
            start = outcome.rewind_from
            history = [(t, v) for t, v in sorted(self.stored.items()) if t > start]
            published = [(x.kind, x.time) for x in self.emitted if x.time > start]
            out = rewind(self.rule, self.state, outcome, history, published)
        self.emitted.extend(out)
        return out


def at(*pairs: tuple[float, float]) -> list[Reading]:
    return [(int(t * S), v) for t, v in pairs]


def kinds(transitions: list[Transition]) -> list[tuple[str, float]]:
    return [(x.kind, x.time / S) for x in transitions]


def test_raises_and_clears_at_the_readings_times() -> None:
    """Without for/keep, the first breaching reading raises and the first other one clears."""
    s = Series(rule())
    out = s.deliver(at((1, 70), (2, 81), (3, 90), (4, 79), (5, 85)))
    assert [("raised", 2), ("cleared", 4), ("raised", 5)] == kinds(out)
    assert out[0].value == 81 and out[1].value == 79
    assert out[1].raised_at == out[0].time


def test_hysteresis_clears_only_past_the_clear_threshold() -> None:
    """Firing stays firing while the value is above the clear threshold, not the threshold."""
    s = Series(rule(threshold=80, clear=75))
    out = s.deliver(at((1, 81), (2, 78), (3, 76), (4, 79), (5, 74.9), (6, 79)))
    assert [("raised", 1), ("cleared", 5)] == kinds(out)


def test_hysteresis_for_a_less_than_rule() -> None:
    """A '<' rule clears only above its clear threshold."""
    s = Series(rule(condition="<", threshold=10, clear=12))
    out = s.deliver(at((1, 9), (2, 11), (3, 11.9), (4, 12)))
    assert [("raised", 1), ("cleared", 4)] == kinds(out)


def test_clear_threshold_on_the_wrong_side_is_refused() -> None:
    """A clear threshold that would never clear is refused with the reason."""
    with pytest.raises(RuleError, match="must not be above"):
        rule(threshold=80, clear=85)
    with pytest.raises(RuleError, match="no hysteresis"):
        rule(condition="==", threshold=1, clear=2)


def test_for_keeps_the_alert_pending_until_the_duration_has_passed() -> None:
    """The condition must hold for `for` seconds of event time; a dip restarts the wait."""
    s = Series(rule(for_s=10))
    out = s.deliver(at((0, 90), (5, 90), (9, 70), (10, 90), (15, 95), (19, 99), (20, 91)))
    assert [("raised", 20)] == kinds(out)
    assert s.state.level == "firing"
    assert out[0].value == 91


def test_keep_firing_for_holds_the_alert_after_the_condition_ends() -> None:
    """The alert clears only once the condition has been false for `keep_firing_for`."""
    s = Series(rule(keep_s=30))
    out = s.deliver(at((0, 90), (10, 70), (20, 90), (30, 70), (50, 70), (60, 70)))
    assert [("raised", 0), ("cleared", 60)] == kinds(out)


def test_no_data_raises_after_silence_and_clears_on_data() -> None:
    """Silence longer than the duration raises (at last reading + duration); data clears it."""
    r = rule(no_data_s=60)
    s = Series(r)
    s.deliver(at((0, 1), (30, 1)))
    assert [] == silence(r, s.state, 60 * S)
    raised = silence(r, s.state, 100 * S)
    assert [("raised", 90)] == kinds(raised)
    assert [] == silence(r, s.state, 200 * S)  # raised once
    out = s.deliver(at((300, 1)))
    assert [("cleared", 300)] == kinds(out)
    assert out[0].reason == "data"


def test_no_data_found_in_a_backlog_is_raised_and_cleared_in_the_past() -> None:
    """A gap in a late backlog raises at its start + duration and clears at its end."""
    s = Series(rule(no_data_s=60))
    out = s.deliver(at((0, 1), (10, 1), (200, 1), (210, 1)))
    assert [("raised", 70), ("cleared", 200)] == kinds(out)


def test_late_backlog_raises_and_clears_at_event_times() -> None:
    """A backlog delivered hours later raises and clears when things happened."""
    s = Series(rule(for_s=60))
    s.deliver(at((0, 20)))
    backlog = [(float(t), 95.0 if 100 <= t < 400 else 20.0) for t in range(10, 3600, 10)]
    out = s.deliver(at(*backlog))
    assert [("raised", 160), ("cleared", 400)] == kinds(out)


def test_out_of_order_batch_is_evaluated_as_if_in_order() -> None:
    """Batch 2 committed before batch 1: the rewind gives the in-order result."""
    batch1 = at((10, 90), (11, 90))
    batch2 = at((12, 90), (13, 70))
    in_order = Series(rule(for_s=2))
    in_order.deliver(at((0, 50)))
    in_order.deliver(batch1)
    in_order.deliver(batch2)
    swapped = Series(rule(for_s=2))
    swapped.deliver(at((0, 50)))
    swapped.deliver(batch2)
    swapped.deliver(batch1)
    assert kinds(in_order.emitted) == kinds(swapped.emitted) == [("raised", 12), ("cleared", 13)]


def test_a_late_reading_that_changes_nothing_published_is_evaluated() -> None:
    """A late reading inside a published alert only extends it: nothing to take back."""
    s = Series(rule())
    s.deliver(at((10, 90), (20, 70)))
    assert [] == s.deliver(at((15, 95)))
    assert 0 == s.state.skipped
    assert [("raised", 30)] == kinds(s.deliver(at((30, 95))))


def test_a_late_reading_that_would_change_a_published_transition_is_skipped() -> None:
    """A late reading that would clear a published alert earlier is counted, not applied."""
    s = Series(rule())
    s.deliver(at((10, 90), (20, 70)))
    assert [] == s.deliver(at((15, 60)))
    assert 1 == s.state.skipped
    assert [("raised", 30)] == kinds(s.deliver(at((30, 95))))


def test_edit_of_the_condition_restarts_pending_but_not_an_unrelated_edit() -> None:
    """Same condition (a rename): pending continues; a new threshold: pending restarts."""
    r = rule(for_s=10)
    s = Series(r)
    s.deliver(at((0, 90)))
    s.rule = dataclasses.replace(r, name="renamed", severity="critical", digest="")
    assert [("raised", 10)] == kinds(s.deliver(at((10, 90))))
    r2 = rule(for_s=10)
    s2 = Series(r2)
    s2.deliver(at((0, 90)))
    s2.rule = rule(for_s=10, threshold=85)
    assert [] == s2.deliver(at((10, 90)))
    assert [("raised", 20)] == kinds(s2.deliver(at((20, 90))))


def test_index_finds_rules_by_tenant_and_metric_and_scope() -> None:
    """The index answers per (tenant, metric); scope picks the device or its type."""
    dev, typ = uuid.uuid4(), uuid.uuid4()
    by_device = Rule(uuid.uuid4(), TENANT, "a", "t", ">", 1, 1, device_id=dev)
    by_type = Rule(uuid.uuid4(), TENANT, "b", "t", ">", 1, 1, device_type_id=typ)
    index = RuleIndex([by_device, by_type])
    assert () == index.for_metric(TENANT, "humidity")
    assert {by_device, by_type} == set(index.for_metric(TENANT, "t"))
    assert by_device.applies(dev, None) and not by_device.applies(uuid.uuid4(), typ)
    assert by_type.applies(uuid.uuid4(), typ) and not by_type.applies(dev, None)
    assert index.typed


# --- properties ------------------------------------------------------------------------------

values = st.sampled_from([60.0, 74.0, 76.0, 79.0, 81.0, 95.0])
rules = st.builds(
    lambda cond, for_s, keep_s: rule(
        condition=cond,
        threshold=80 if cond == ">" else 75,
        clear=75 if cond == ">" else 80,
        for_s=for_s,
        keep_s=keep_s,
    ),
    st.sampled_from([">", "<"]),
    st.sampled_from([0, 3, 10]),
    st.sampled_from([0, 2, 7]),
)


@st.composite
def batches(draw: st.DrawFn) -> list[list[Reading]]:
    n = draw(st.integers(1, 200))
    times = sorted(draw(st.sets(st.integers(0, 400), min_size=n, max_size=n)))
    readings = [(t * S, draw(values)) for t in times]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=6)))
    out, start = [], 0
    for c in [*cuts, n]:
        if c > start:
            out.append(readings[start:c])
            start = c
    return out


def core(state: State) -> tuple[object, ...]:
    return (state.level, state.since, state.last_time, state.raised_at, state.checkpoints)


@settings(max_examples=300, deadline=None)
@given(rules, batches(), st.data())
def test_the_same_batch_twice_changes_nothing(
    r: Rule, parts: list[list[Reading]], data: st.DataObject
) -> None:
    """Delivering any batch again leaves the state as it was and emits nothing."""
    s = Series(r)
    for part in parts:
        s.deliver(part)
    before = core(s.state)
    again = data.draw(st.sampled_from(parts))
    assert [] == s.deliver(again)
    assert before == core(s.state)


@settings(max_examples=300, deadline=None)
@given(rules, batches(), st.randoms(use_true_random=False))
def test_any_delivery_order_gives_the_in_order_transitions(
    r: Rule, parts: list[list[Reading]], rnd: object
) -> None:
    """Batches committed in any order end in the transitions and state of in-order delivery.

    (Out-of-order readings within REWIND_SPAN of the newest, and none before a transition that
    was already emitted by the time they arrive, which the skipped counter shows.)
    """
    assert 400 * S < REWIND_SPAN_US
    in_order = Series(r)
    for part in parts:
        in_order.deliver(part)
    shuffled = list(parts)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    other = Series(r)
    for part in shuffled:
        other.deliver(part)
    if other.state.skipped == 0:
        assert kinds(in_order.emitted) == kinds(other.emitted)
        assert core(in_order.state) == core(other.state)
    # Whatever the order, transitions alternate and no alert is raised twice.
    seen = [t.kind for t in other.emitted]
    assert all(a != b for a, b in itertools.pairwise(seen))
    assert len({t.raised_at for t in other.emitted if t.kind == "raised"}) == seen.count("raised")


@settings(max_examples=300, deadline=None)
@given(rules, batches())
def test_raises_only_on_breaches_and_clears_only_past_the_clear_threshold(
    r: Rule, parts: list[list[Reading]]
) -> None:
    """Every raise is on a breaching reading held `for`; every clear on a value past the clear
    threshold held `keep_firing_for`."""
    s = Series(r)
    readings = dict(x for p in parts for x in p)
    for part in parts:
        s.deliver(part)
    for tr in s.emitted:
        assert tr.value is not None
        if tr.kind == "raised":
            assert r.breaches(tr.value)
            held = [v for t, v in readings.items() if tr.time - r.for_us <= t <= tr.time]
            assert all(r.breaches(v) for v in held)
        else:
            assert not r.holds(tr.value)
            held = [
                v for t, v in readings.items() if tr.time - r.keep_firing_for_us <= t <= tr.time
            ]
            assert not any(r.holds(v) for v in held)


@settings(max_examples=300, deadline=None)
@given(rules, batches())
def test_whole_batches_give_what_reading_by_reading_stepping_gives(
    r: Rule, parts: list[list[Reading]]
) -> None:
    """The batch fast path (nothing can change the level) is exactly per-reading stepping."""
    s = Series(r)
    for part in parts:
        s.deliver(part)
    reference = State(r.digest)
    out: list[Transition] = []
    for t, v in sorted(x for p in parts for x in p):
        step(r, reference, t, v, out)
    assert kinds(out) == kinds(s.emitted)
    assert core(reference) == core(s.state)


def test_the_fast_path_marks_checkpoints_like_stepping() -> None:
    """A quiet hour in one batch leaves the checkpoints a reading-by-reading pass leaves."""
    r = rule()
    s = Series(r)
    s.deliver(at((0, 20)))
    s.deliver([(t * S, 20.0) for t in range(1, 3600)])
    reference = State(r.digest)
    for t in range(3600):
        step(r, reference, t * S, 20.0, [])
    assert reference.checkpoints == s.state.checkpoints
    assert len(s.state.checkpoints) > 2
