"""The nightly gate: whether a night's candidate (a projector, or Whisper decoder adapters) is better
for the household than what is served, and not worse on other voices (`decide`); and, for `--path auto`,
whether a version's aligned path beats its cascade (`path_auto`).

Answers are read utterance by utterance: a sign test over the held-out utterances whose answer changed,
so that one utterance flipping on a small set promotes nothing.
"""

from __future__ import annotations

import math
from typing import Any

from .evaluate import score_answers, word_edits
from .intents import Answer
from .manifest import Utterance

SIGNIFICANCE = 0.1  # a household gain or a drop elsewhere counts when a one-sided sign test is below this
LOSS_GUARD = 0.1  # a candidate whose household held-out loss rose more than this share is broken
# The answers' metrics a night is judged by: report key, how a reason names it, +1 if higher is better.
ANSWER_METRICS = (("intent_accuracy", "intent accuracy", 1), ("wer", "WER", -1))
# The fewest held-out utterances a gain can show on: with fewer, even all of them better is no less
# likely by chance than SIGNIFICANCE (sign test: 0.5 ** n).
MIN_JUDGED = math.floor(math.log2(1 / SIGNIFICANCE)) + 1


def paired_changes(refs: list[Utterance], before: list[Answer], after: list[Answer]) -> dict[str, list[int]]:
    """Per utterance, how many got worse and how many better: intent right/wrong, and word edits."""
    intent, wer = [0, 0], [0, 0]
    for ref, old, new in zip(refs, before, after, strict=True):
        if ref.intent is not None:
            was, now = ref.intent.matches(old[1]), ref.intent.matches(new[1])
            intent[0] += was and not now
            intent[1] += now and not was
        was_edits, now_edits = (word_edits(ref.text, hyp[0]) for hyp in (old, new))
        wer[0] += now_edits > was_edits
        wer[1] += now_edits < was_edits
    return {"intent_accuracy": intent, "wer": wer}


def sign_test(worse: int, better: int) -> float:
    """One-sided p-value of at least `worse` of the `worse + better` changed utterances getting worse if
    each change were a coin flip."""
    n = worse + better
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n if n else 1.0


def path_auto(
    refs: list[Utterance],
    cascade: list[Answer],
    aligned: list[Answer],
    tolerance: float,
) -> dict[str, Any]:
    """For `--path auto` (`versions.household_validated`): the aligned path against the cascade a
    version serves, on the household's held-out utterances (`refs`) both answered, judged by `decide` as
    a night's candidate is (per utterance, better by more than chance, the set's figures within
    `tolerance`). A night's 16 held-out utterances once showed an aligned path two commands ahead that,
    on 50 others, understood five fewer than the cascade."""
    changes = paired_changes(refs, cascade, aligned)
    beats, _ = decide(
        {"household": score_answers(refs, aligned)},
        {"household": score_answers(refs, cascade)},
        tolerance,
        {"household": changes},
    )
    return {"aligned_vs_cascade": changes, "aligned_beats_cascade": beats}


def decide(
    candidate: dict,
    serving: dict,
    tolerance: float,
    paired: dict[str, dict[str, list[int]]] | None = None,
    on: str = "answers",
    shipped: dict | None = None,
) -> tuple[bool, str]:
    """Promote only if better for the household and not worse on the general held-out set.

    Household: neither intent accuracy nor WER may get worse, and one must get better by more than
    chance: a one-sided sign test over the held-out utterances that changed (`paired["household"]`:
    [worse, better] counts per metric) must be below `SIGNIFICANCE`, so one utterance flipping on a
    small set cannot promote a projector. With those counts, better and worse are read per utterance
    (more utterances better than worse), for WER too: one answer gone badly wrong (a long insertion)
    raises the set's WER over many utterances heard better, and must not outweigh them, unless it takes
    the set's figure past `tolerance` (absolute), as on the general set. Only when both
    are unchanged does the held-out loss decide (lower by 0.5 %). A loss more than `LOSS_GUARD` above
    the served one's always rejects: it marks a broken projector whose answers happened to suit a small
    held-out set.

    General: a drop of intent accuracy or a rise of WER beyond `tolerance` (absolute) rejects, unless
    the household's answers got better and the sign test over `paired["general"]` finds the drop could
    be chance (p >= `SIGNIFICANCE`): one or two utterances flipping must not block the household's
    progress, but a lower loss alone is no progress to set against them. Without `paired` (nothing was
    served before) the figures alone decide. Returns (promote, reason).

    `shipped`: the bundle's own projector's figures on the general set, when a household version is
    served. The candidate is held to them as well, by the same rule (`paired["shipped"]`: candidate
    against shipped, per utterance), so that drops each small enough to pass as chance do not add up
    over many promoted nights.

    `on="loss"` decides on the held-out loss alone (household: lower by 0.5 %; general: not higher by
    more than `tolerance`, relative, than the served and the shipped projector's): for development
    models too small for their answers to mean anything."""
    mine, theirs = candidate["household"], serving["household"]
    general = candidate.get("general") or {}
    anchors = [("", serving.get("general") or {}, "general")]
    if shipped:
        anchors.append((" than the shipped projector", shipped, "shipped"))
    if on == "loss":
        return _decide_on_loss(mine, theirs, general, anchors, tolerance)
    c, s = mine.get("loss"), theirs.get("loss")
    if c is not None and s is not None and c > s * (1 + LOSS_GUARD):
        return False, f"worse for the household: held-out loss {s} -> {c} (up more than {LOSS_GUARD:.0%})"
    gains, refusal = _household_gains(mine, theirs, tolerance, (paired or {}).get("household", {}))
    if refusal:
        return False, refusal
    answers_better = bool(gains)
    if not gains:
        c, s = mine.get("loss"), theirs.get("loss")
        if c is None or s is None or not c < s * (1 - 0.005):
            figures = [(label, theirs.get(key), mine.get(key)) for key, label, _ in ANSWER_METRICS]
            figures.append(("held-out loss", s, c))
            changes = ", ".join(
                f"{label} {a} -> {b}" for label, a, b in figures if a is not None and b is not None
            )
            return (
                False,
                f"no better for the household: no more of its utterances better than worse ({changes})",
            )
        gains.append(f"equal intent accuracy and WER, held-out loss {s} -> {c}")
    verdict = ", ".join(gains)
    worse, notes = _other_voices(general, anchors, tolerance, paired or {}, answers_better)
    if worse:
        return False, f"better for the household ({verdict}) but {worse}"
    tail = f"; {'; '.join(notes)}" if notes else ""
    return True, f"better for the household ({verdict}), not worse on other voices{tail}"


def _household_gains(
    mine: dict, theirs: dict, tolerance: float, paired: dict[str, list[int]]
) -> tuple[list[str], str | None]:
    """`decide`'s household rule on the answers' metrics: the gains beyond chance, or why the candidate
    is refused (worse, or better only by what could be chance)."""
    gains, chance = [], []
    for key, label, better in ANSWER_METRICS:
        c, s = mine.get(key), theirs.get(key)
        if c is None or s is None:
            continue
        change = f"{label} {s} -> {c}"
        counts = paired.get(key)
        if counts is None:  # nothing served before to compare answers with: the figures alone
            if abs(c - s) <= 1e-9:
                continue
            if better * (c - s) < 0:
                return [], f"worse for the household: {label} {c} vs {s} served"
            gains.append(change)
            continue
        worse, gained = counts
        if worse > gained:
            why = f"worse for {worse} of the {worse + gained} utterances that changed"
            return [], f"worse for the household: {label} {c} vs {s} served, {why}"
        if better * (s - c) > tolerance + 1e-9:  # more heard better, but the set's figure fell too far
            return [], f"worse for the household: {label} {c} vs {s} served (tolerance {tolerance})"
        if worse == gained:
            continue
        if better * (c - s) <= 1e-9:  # better per utterance, not over all: say why it counts as better
            change += f" over all, but better for {gained} of the {worse + gained} utterances that changed"
        if (p := sign_test(gained, worse)) >= SIGNIFICANCE:
            chance.append(f"{change} on {mine.get('n')} utterances could be chance (p={p:.2f})")
        else:
            gains.append(change)
    if chance and not gains:
        return [], f"no better for the household: {'; '.join(chance)}"
    return gains, None


def _other_voices(
    general: dict,
    anchors: list[tuple[str, dict, str]],
    tolerance: float,
    paired: dict[str, dict[str, list[int]]],
    answers_better: bool,
) -> tuple[str | None, list[str]]:
    """`decide`'s rule on the general set, against each anchor (the served projector's figures, and the
    shipped one's): why the candidate is worse there (None: it is not), and the drops let through as
    chance."""
    notes = []
    for than, before, pairs in anchors:
        if not (general.get("n") and before.get("n")):
            continue
        for key, label, better in ANSWER_METRICS:
            c, s = general.get(key), before.get(key)
            if c is None or s is None or better * (s - c) <= tolerance + 1e-9:
                continue
            change = f"{label} {s} -> {c}"
            counts = paired.get(pairs, {}).get(key)
            if answers_better and counts is not None and (p := sign_test(*counts)) >= SIGNIFICANCE:
                notes.append(f"{change}{than} on {general['n']} utterances could be chance (p={p:.2f})")
                continue
            return f"worse on other voices{than}: {change} (tolerance {tolerance})", notes
    return None, notes


def _decide_on_loss(
    mine: dict, theirs: dict, general: dict, anchors: list[tuple[str, dict, str]], tolerance: float
) -> tuple[bool, str]:
    c, s = mine.get("loss"), theirs.get("loss")
    if c is None or s is None or not c < s * (1 - 0.005):
        return False, f"no better for the household: held-out loss {s} -> {c}"
    verdict = f"better for the household (held-out loss {s} -> {c})"
    gc = general.get("loss")
    for than, before, _ in anchors:
        gs = before.get("loss")
        if gc is not None and gs is not None and gc > gs * (1 + tolerance):
            return False, f"{verdict} but worse on other voices{than} ({gs} -> {gc})"
    gs = anchors[0][1].get("loss")
    return True, f"{verdict}, not worse on other voices ({gs} -> {gc})"
