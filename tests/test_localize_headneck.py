"""Real data at scale: pretrain APE on part of the head-and-neck cohort, localize its organs on other cases.

The cohort (../shared/data/Dataset901_HeadNeckCT, 203 CTs) contours each organ in only some cases; per organ only
those count. The pretraining is the tiny network with the short-run settings that `benchmarks/bench_headneck_levers.py`
measures as its ``default`` row (same flags, same cases, same iterations); the margins below come from its runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, announced, say

HEADNECK = DATA.parent / "Dataset901_HeadNeckCT"
PRETRAIN_CASES = 143  # hn_001..hn_168 in name order pretrain; the others were never seen
ITERATIONS = 800
EVAL_CASES = 40  # hn_169..hn_214 (case numbers have gaps)
SHOTS, FOLDS = 5, 1
PAROTIDS = ("parotid_left", "parotid_right")
# Margins from the measured runs (2 CPU cores). This test's configuration, 2026-12-05 with the body search: parotid
# IoU all voxels 0.221 / 0.277 (right / left) against the body box's 0.150 / 0.133; the 'small' model of
# bench_headneck.py: 0.38 / 0.39 against 0.14 / 0.12 at 5 shots. The chosen method's mean calibrated recall on the
# test cases was 0.958 against 0.966 for the body box.
RECALL_SLACK, VR_SLACK, IOU_MARGIN = 0.02, 0.9, 0.03
ORGAN_RECALL_SLACK = 0.08  # the worst organ measured: 0.057 below the body box (right parotid, 2026-12-05)
# Cross-patient centroid retrieval (one shot's organ centroid, nearest embedding in another held-out CT; brainstem,
# spinal cord, parotids, mandible on the first 10 held-out cases), this configuration, 2026-12-05: mean of the organs'
# mean errors 38 mm searching the body (grown by 5 mm), 95 mm searching the whole image as the project did before.
CENTROID_CASES, CENTROID_ORGANS, CENTROID_BOUND_MM = 10, (1, 2, 3, 4, 7), 55.0

# about 4.5 minutes on 2 cores (3 of them pretraining): slow-marked to keep the default run under 20 minutes
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HEADNECK.exists(), reason="head-and-neck dataset not available")]


@pytest.fixture(scope="module")
def headneck(tmp_path_factory) -> dict:
    """The 5-shot protocol on held-out cases with a tiny APE pretrained on the first 143 cases: per organ results."""
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.evaluate import evaluate_organ, prepare
    from nnunet_ape.localize.localizer import embed_settings_for
    from nnunet_ape.pretrain.batches import BatchConfig
    from nnunet_ape.pretrain.train_ape import PretrainConfig, parse_spacing_range, pretrain_ape

    cases = sorted(cases_from_nnunet(str(HEADNECK)), key=lambda c: c.name)
    run = tmp_path_factory.mktemp("headneck") / "ape"
    cfg = PretrainConfig(iterations=ITERATIONS, lr=2e-3, lr_schedule="cosine", model="tiny", workers=1, checkpoint_every=500,
                         device="cpu", seed=0,
                         batch=BatchConfig(variant="equiv", pairs=4, voxels=2048, patch_volume=300_000,
                                           spacing_range=parse_spacing_range("4,4,4:5,5,5"), max_scan_fraction=0.6))
    with announced(f"pretraining the tiny APE on {PRETRAIN_CASES} head-and-neck CTs for {ITERATIONS} iterations"):
        checkpoint = pretrain_ape([c.image for c in cases[:PRETRAIN_CASES]], run, cfg)
    model, _ = load_ape_model(checkpoint)
    settings = embed_settings_for(checkpoint)
    organs = {k: v for k, v in cases[0].labels.items() if v}
    held_out = cases[PRETRAIN_CASES : PRETRAIN_CASES + EVAL_CASES]
    with tempfile.TemporaryDirectory() as store, announced(f"{SHOTS}-shot localization of 7 organs on {EVAL_CASES} held-out CTs"):
        prepared = [prepare(c, model, settings, "cpu", None, Path(store)) for c in held_out]
        # label transfer (all voxels) only where the test asserts on it: its neighbour searches dominate the time
        results = {o: evaluate_organ(prepared, v, SHOTS, max_folds=FOLDS, all_voxels=o in PAROTIDS) for o, v in organs.items()}
        centroids = {"body": centroid_errors(prepared[:CENTROID_CASES])}
        del prepared
        whole = [prepare(c, model, settings, "cpu", None, search_margin_mm=None) for c in held_out[:CENTROID_CASES]]
        centroids["image"] = centroid_errors(whole)
    results["centroid_errors_mm"] = centroids
    say(f"  centroid retrieval, mean error: body {centroids['body']:.1f} mm, whole image {centroids['image']:.1f} mm")
    for organ, r in results.items():
        if organ == "centroid_errors_mm":
            continue
        say(f"  {organ}: {r['evaluated']} tests, chosen {r.get('chosen')}, IoU APE {r.get('iou_ape', 0):.3f} / all voxels "
            f"{r.get('iou_ape_all', float('nan')):.3f} / body {r.get('iou_body_box', 0):.3f}; recall/VR chosen "
            f"{r.get('recall_calibrated_chosen', 0):.3f}/{r.get('vr_calibrated_chosen', 0):.1f}, body "
            f"{r.get('recall_calibrated_body_box', 0):.3f}/{r.get('vr_calibrated_body_box', 0):.1f}")
    return results


def centroid_errors(prepared: list) -> float:
    """Mean over :data:`CENTROID_ORGANS` of the mean distance (mm) between an organ's centroid in one case and the
    voxel retrieved there for another case's centroid embedding, over all ordered pairs of cases contouring it."""
    import numpy as np
    from scipy import ndimage

    from nnunet_ape.localize.fewshot import point_queries
    from nnunet_ape.localize.retrieval import nearest_voxels

    means = []
    for value in CENTROID_ORGANS:
        have = [p for p in prepared if (p.label == value).any()]
        centres = [ndimage.center_of_mass(p.label == value) for p in have]
        queries = [point_queries(p.embedding, np.round(c).astype(int)[None], p.label == value) for p, c in zip(have, centres)]
        errors = [np.linalg.norm(other.ct.index_to_physical(nearest_voxels(q, other.embedding)[0].astype(float))
                                 - other.ct.index_to_physical(np.asarray(centres[j])))
                  for i, q in enumerate(queries) for j, other in enumerate(have) if j != i]
        means.append(float(np.mean(errors)))
    return float(np.mean(means))


def test_cross_patient_centroids_are_found_in_the_body_not_in_the_air(headneck):
    errors = headneck["centroid_errors_mm"]
    assert errors["body"] < CENTROID_BOUND_MM
    assert errors["image"] > errors["body"] * 1.5  # what searching the whole image did
    # the protocol's MRE_c (5 shots, 40 held-out cases) reports the same range
    mre = [r["mre_c"][0] for o, r in headneck.items() if o != "centroid_errors_mm" and r.get("evaluated")]
    assert np.mean(mre) < CENTROID_BOUND_MM


def test_the_chosen_method_keeps_about_as_much_as_the_body_box(headneck):
    """With 5 shots the enlargement covers about 5 of 6 new cases, so a chosen APE crop can keep less than the body
    box on test cases (2026-12-05, body search: right parotid 0.941 against 0.998, at a 15x smaller crop); over the
    organs the choice costs little recall, and where it keeps less it crops much less."""
    done = {o: r for o, r in headneck.items() if o != "centroid_errors_mm" and r.get("evaluated")}
    chosen = np.mean([r["recall_calibrated_chosen"] for r in done.values()])
    body = np.mean([r["recall_calibrated_body_box"] for r in done.values()])
    assert chosen >= body - RECALL_SLACK
    for organ, r in done.items():
        assert r["recall_calibrated_chosen"] >= r["recall_calibrated_body_box"] - ORGAN_RECALL_SLACK, organ
        assert r["vr_calibrated_chosen"] >= r["vr_calibrated_body_box"] * VR_SLACK or \
            r["recall_calibrated_chosen"] > r["recall_calibrated_body_box"] + RECALL_SLACK, organ
        if r["recall_calibrated_chosen"] < r["recall_calibrated_body_box"] - RECALL_SLACK:
            assert r["vr_calibrated_chosen"] >= 3 * r["vr_calibrated_body_box"], organ


def test_ape_beats_the_body_box_on_the_parotids(headneck):
    for organ in PAROTIDS:
        r = headneck[organ]
        assert r["evaluated"] >= 20
        assert r["iou_ape_all"] > r["iou_body_box"] + IOU_MARGIN, organ
