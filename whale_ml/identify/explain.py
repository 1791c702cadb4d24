"""Why a candidate ranks where it does: the parts of its score, as JSON and as one line.

An identification result (:func:`~whale_ml.identify.matching.identify_photos`) gives each
candidate a ``score_parts`` object: per matcher the fusion weighs (``global``: the
best-photo cosine; ``local``: the RANSAC inliers of local features; ``centre``: the
class-centre cosine), its raw ``value``, calibrated ``probability``, ``weight`` and
``contribution`` (``weight * probability``); the contributions sum to the candidate's
``similarity``, the ranking score. Without a fusion the score is the cosine itself: one
``global`` part of weight 1 and no probability. Each photo row's ``lead`` says what the
first candidate's lead over the second adds to its ``decision_score``. The JSON schema
is in ``docs/identify.md``; the terminal text and the HTML report print the same parts
with :func:`format_parts` and :func:`format_lead`.
"""

from __future__ import annotations

import math
from typing import Any

from whale_ml.retrieval.fusion import CENTRE, GLOBAL, LOCAL, ScorePart

DIGITS = 6  # the JSON's rounding: the contributions sum to ``similarity`` within 1e-5


def _number(x: float) -> float | None:
    """A rounded float for JSON; None for NaN (JSON has no NaN)."""
    x = float(x)
    return round(x, DIGITS) if math.isfinite(x) else None


def score_parts_json(parts: dict[str, ScorePart], q: int, c: int) -> dict[str, dict[str, Any]]:
    """The ``score_parts`` of query ``q``'s candidate ``c`` (indices into the parts' (q, 5) arrays)."""
    out: dict[str, dict[str, Any]] = {}
    for name, part in parts.items():
        value = part.value[q, c]
        entry: dict[str, Any] = {
            "value": int(value) if name == LOCAL else _number(value),
            "probability": None if part.probability is None else _number(part.probability[q, c]),
            "weight": round(float(part.weight), DIGITS),
            "contribution": _number(part.contribution[q, c]),
        }
        if name == CENTRE:
            # No class centre (an individual no fold model trained on): the global probability stands in.
            entry["from_global"] = not math.isfinite(float(value))
        out[name] = entry
    return out


def lead_json(lead: float, lead_weight: float) -> dict[str, float]:
    """A photo row's ``lead``: the first candidate's lead over the second (``value``, 0
    without a second), its ``weight`` and ``contribution``; ``decision_score`` is the first
    candidate's ``similarity`` plus ``contribution``."""
    contribution = lead_weight * lead if lead_weight > 0 else 0.0
    return {
        "value": round(float(lead), DIGITS),
        "weight": round(float(lead_weight), DIGITS),
        "contribution": round(float(contribution), DIGITS),
    }


_NAMES = {GLOBAL: "global", LOCAL: "local", CENTRE: "centre"}


def format_parts(candidate: dict[str, Any], times: str = "x") -> str:
    """One line: ``0.8120 = global 0.60x0.700 (cos 0.604) + local 0.25x0.950 (12 inliers) + ...``
    (each part ``weight x probability``, its raw value in brackets); ``cosine`` alone
    without a fusion. ``times`` is the multiplication sign (the report uses ``×``)."""
    parts = candidate.get("score_parts") or {}
    score = f"{candidate['similarity']:.4f}"
    if set(parts) <= {GLOBAL} and (parts.get(GLOBAL) or {}).get("probability") is None:
        return f"{score} = cosine similarity"
    terms = []
    for name, p in parts.items():
        if name == LOCAL:
            raw = f"{p['value']} inliers"
        elif name == CENTRE and p.get("from_global"):
            raw = "no centre: global's"
        else:
            raw = f"cos {p['value']:.3f}"
        prob = p["probability"] if p["probability"] is not None else float("nan")
        terms.append(f"{_NAMES.get(name, name)} {p['weight']:.2f}{times}{prob:.3f} ({raw})")
    return f"{score} = " + " + ".join(terms)


def format_lead(row: dict[str, Any], times: str = "x") -> str | None:
    """``decision 0.8450 = 0.8120 + 0.50x lead 0.0660``; None where the lead has no weight
    (the decision score is then the first candidate's similarity)."""
    lead = row.get("lead")
    if not lead or not lead["weight"] or not row["candidates"]:
        return None
    first = row["candidates"][0]["similarity"]
    return f"decision {row['decision_score']:.4f} = {first:.4f} + {lead['weight']:.2f}{times} lead {lead['value']:.4f}"
