"""The parts of a ranking score (Fusion.parts, Matcher.rank, match_queries) and how identify shows them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from whale_ml.identify.explain import format_lead, format_parts, lead_json, score_parts_json
from whale_ml.retrieval.fusion import Calibration, Fusion, fused_scores
from whale_ml.retrieval.matcher import Evidence, FoldGallery, Matcher, match_queries

# P_global(s) = sigmoid(10 s - 5), P_local(e) = sigmoid(2 e - 2) with e = log1p(inliers), P_centre like P_global.
G, L, C = Calibration(10.0, -5.0), Calibration(2.0, -2.0), Calibration(10.0, -5.0)
CALS = {"global": G, "local": L, "centre": C}
FUSION = Fusion({"global": 0.5, "local": 0.25, "centre": 0.25}, CALS)

# Query 0: b has the higher cosine, a the inliers (centres equal): a ranks first.
# Query 1: e has the higher cosine, d the nearer class centre (inliers equal): d ranks first.
# Query 2: f has no class centre (an individual enrolled later): its global probability stands in;
# its one rival is padding.
SIMS = np.array([[0.60, 0.56], [0.60, 0.56], [0.58, -np.inf]])
IDS = np.array([["b", "a"], ["e", "d"], ["f", ""]], dtype=object)
INLIERS = np.array([[0, 20], [3, 3], [5, 0]])
CENTRES = np.array([[0.5, 0.5], [0.3, 0.8], [np.nan, np.nan]])


def test_the_contributions_sum_to_the_fused_score_exactly():
    parts = FUSION.parts(SIMS, INLIERS, CENTRES)
    assert list(parts) == ["global", "local", "centre"]
    fused = FUSION.scores(SIMS, INLIERS, CENTRES)
    assert np.array_equal(fused_scores(parts), fused)
    valid = np.isfinite(SIMS)
    total = parts["global"].contribution + parts["local"].contribution + parts["centre"].contribution
    assert np.array_equal(total[valid], fused[valid]) and np.isneginf(fused[~valid]).all()
    assert all(np.isnan(p.probability[~valid]).all() for p in parts.values())  # padding has no parts
    for name, part in parts.items():
        assert part.weight == FUSION.weights[name]
        assert np.allclose(part.contribution, part.weight * part.probability, equal_nan=True)
    # The raw values are what was given: cosines, inlier counts (not their log), centre cosines.
    assert np.array_equal(parts["local"].value, INLIERS) and np.array_equal(parts["global"].value, SIMS)
    # A missing centre takes the global probability.
    assert parts["centre"].probability[2, 0] == parts["global"].probability[2, 0]
    assert np.isnan(parts["centre"].value[2, 0])


def test_a_matcher_of_weight_0_is_left_out_and_needs_no_evidence():
    tuned_out = Fusion({"global": 0.75, "local": 0.25, "centre": 0.0}, CALS)
    parts = tuned_out.parts(SIMS, INLIERS)  # no centre similarities needed
    assert list(parts) == ["global", "local"]
    assert np.array_equal(fused_scores(parts), tuned_out.scores(SIMS, INLIERS))
    with pytest.raises(ValueError, match="inliers"):
        tuned_out.parts(SIMS)


def test_a_lower_cosine_ranks_higher_and_its_parts_show_why():
    matcher = Matcher(0.5, fusion=FUSION, candidates=2)
    ranked = matcher.rank(Evidence(SIMS, IDS, INLIERS, CENTRES))
    assert ranked.ids[:, :2].tolist() == [["a", "b"], ["d", "e"], ["f", ""]]
    # Sorted alike: the evidence of each row follows its candidate.
    assert ranked.embedding_sims[:2].tolist() == [[0.56, 0.60], [0.56, 0.60]]
    assert ranked.inliers[0].tolist() == [20, 0] and ranked.centre_sims[1].tolist() == [0.8, 0.3]
    total = sum(p.contribution for p in ranked.parts.values())
    assert np.array_equal(total[:, 0], ranked.scores[:, 0])  # exact, as ranked
    g, loc, c = (ranked.parts[m].contribution for m in ("global", "local", "centre"))
    # a loses on the cosine and wins it back on the inliers; d on the class centre.
    assert g[0, 0] < g[0, 1] and loc[0, 0] - loc[0, 1] > g[0, 1] - g[0, 0] and c[0, 0] == c[0, 1]
    assert g[1, 0] < g[1, 1] and c[1, 0] - c[1, 1] > g[1, 1] - g[1, 0] and loc[1, 0] == loc[1, 1]
    # The same scores as the fused ranking everyone else applies.
    assert np.array_equal(np.sort(ranked.scores, axis=1)[:, ::-1], np.sort(FUSION.scores(SIMS, INLIERS, CENTRES), axis=1)[:, ::-1])

    # As identify states them: the JSON parts sum to the similarity (to its rounding).
    for q in range(2):
        for k in range(2):
            parts = score_parts_json(ranked.parts, q, k)
            assert sum(p["contribution"] for p in parts.values()) == pytest.approx(float(ranked.scores[q, k]), abs=1e-5)
    first = score_parts_json(ranked.parts, 0, 0)
    assert first["local"]["value"] == 20 and first["global"]["value"] == 0.56 and first["centre"]["from_global"] is False
    missing = score_parts_json(ranked.parts, 2, 0)["centre"]
    assert missing["value"] is None and missing["from_global"] is True
    line = format_parts({"similarity": round(float(ranked.scores[0, 0]), 6), "score_parts": first})
    assert line.startswith(f"{ranked.scores[0, 0]:.4f} = global 0.50x") and "(20 inliers)" in line and "cos 0.560" in line


def _gallery() -> tuple[FoldGallery, np.ndarray]:
    """Four photos of three individuals in 3-D, and two queries near individuals x and z."""
    emb = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = pd.DataFrame({"image": ["1.jpg", "2.jpg", "3.jpg", "4.jpg"], "individual_id": ["x", "x", "y", "z"], "species": ["s"] * 4})
    queries = np.array([[0.95, 0.3, 0.1], [0.2, 0.3, 0.9]], dtype=np.float32)
    return FoldGallery("g", table, emb, k=4), queries / np.linalg.norm(queries, axis=1, keepdims=True)


def test_without_a_fusion_the_score_is_the_cosine_alone():
    gallery, queries = _gallery()
    found = match_queries(gallery, queries, Matcher(0.5, lead_weight=0.5))
    assert list(found.parts) == ["global"]
    part = found.parts["global"]
    assert part.weight == 1.0 and part.probability is None
    assert np.array_equal(part.contribution, np.asarray(found.sims, dtype=np.float64))
    assert np.array_equal(found.embedding_sims, found.sims)
    # The decision is the first similarity plus the lead's share; the others' are their own.
    assert np.allclose(found.decisions[:, 0], found.sims[:, 0] + 0.5 * found.leads)
    assert np.allclose(found.leads, found.sims[:, 0] - found.sims[:, 1])
    assert format_parts({"similarity": 0.9, "score_parts": score_parts_json(found.parts, 0, 0)}) == "0.9000 = cosine similarity"
    lead = lead_json(float(found.leads[0]), 0.5)
    first = {"similarity": round(float(found.sims[0, 0]), 6)}
    row = {"decision_score": round(float(found.decisions[0, 0]), 6), "lead": lead, "candidates": [first]}
    assert row["candidates"][0]["similarity"] + lead["contribution"] == pytest.approx(row["decision_score"], abs=2e-6)
    assert format_lead(row).startswith(f"decision {row['decision_score']:.4f} = ")
    assert format_lead({**row, "lead": lead_json(0.1, 0.0)}) is None  # no weight: nothing to explain


def test_a_fused_match_states_calibrated_parts():
    gallery, queries = _gallery()
    fusion = Fusion({"global": 1.0, "local": 0.0}, {"global": G, "local": L})  # local tuned out: no features needed
    found = match_queries(gallery, queries, Matcher(0.5, fusion=fusion))
    assert list(found.parts) == ["global"]
    valid = np.isfinite(found.sims)
    assert valid.sum() == 6 and np.isnan(found.parts["global"].probability[~valid]).all()  # 3 individuals, 2 pads per query
    assert np.array_equal(found.parts["global"].contribution[valid], found.sims[valid])
    assert np.allclose(found.parts["global"].probability[valid], G(found.embedding_sims[valid]))


def _result() -> dict:
    """An identify result of one photo, its two candidates ranked by the fusion (query 0 above)."""
    ranked = Matcher(0.5, fusion=FUSION, candidates=2, lead_weight=0.5).rank(Evidence(SIMS, IDS, INLIERS, CENTRES))
    candidates = [
        {
            "rank": k + 1,
            "individual_id": str(ranked.ids[0, k]),
            "similarity": round(float(ranked.scores[0, k]), 6),
            "embedding_similarity": float(ranked.embedding_sims[0, k]),
            "inliers": int(ranked.inliers[0, k]),
            "score_parts": score_parts_json(ranked.parts, 0, k),
            "decision_score": round(float(ranked.scores[0, k]), 6),
            "above_threshold": True,
            "gallery_image": f"{ranked.ids[0, k]}.jpg",
            "gallery_crop": None,
            "gallery_source": "pipeline",
        }
        for k in range(2)
    ]
    lead = lead_json(float(ranked.scores[0, 0] - ranked.scores[0, 1]), 0.5)
    candidates[0]["decision_score"] = round(candidates[0]["similarity"] + lead["contribution"], 6)
    row = {
        "image": "q.jpg", "status": "ok", "error": None, "crop_path": None, "crop_is_full_frame": False, "threshold": 0.5,
        "decision_score": candidates[0]["decision_score"], "lead": lead, "decision": "a", "new_individual": False,
        "candidates": candidates, "predictions": ["a", "b", "new_individual"],
    }  # fmt: skip
    gallery = {"version": "v0001", "photos": 4, "individuals": 2, "enrolled_photos": 0}
    return {"gallery": gallery, "threshold": 0.5, "lead_weight": 0.5, "fusion_weights": FUSION.weights, "models": [], "photos": [row]}


def test_the_text_and_the_report_show_the_parts_and_the_lead():
    from whale_ml.identify.matching import format_text
    from whale_ml.identify.report import render_report

    result = _result()
    text = format_text(result).splitlines()
    at = next(i for i, line in enumerate(text) if line.startswith("  1. a "))
    assert text[at + 1].strip().startswith(f"{result['photos'][0]['candidates'][0]['similarity']:.4f} = global 0.50x")
    assert "(20 inliers)" in text[at + 1] and "(0 inliers)" in text[at + 3]
    assert any(line.strip().startswith("decision ") and "0.50x lead" in line for line in text)
    page = render_report(result)
    assert page.count('class="parts"') == 2 and "local 0.25×" in page and 'class="lead"' in page
