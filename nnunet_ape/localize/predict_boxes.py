"""Predict organ boxes on a CT with a fitted localizer: one APE map (and BPR scores) of the canonical CT, retrieval
in the body, the chosen method's crop box per organ, converted back to the CT's voxel indices once."""

from __future__ import annotations

import numpy as np
from torch import nn

from nnunet_ape.canonical import CanonicalCT, canonical_ct
from nnunet_ape.crop_geometry import box_from_canonical, overlaps_image
from nnunet_ape.embed import CanonicalMap, EmbedSettings, GridMap, canonical_map, network_map
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume
from nnunet_ape.localize.body import body_box, search_region
from nnunet_ape.localize.choice import SAFETY_NET_SLACK, box_in_body, safety_net, with_z
from nnunet_ape.localize.fewshot import cut_sides, predict_box
from nnunet_ape.localize.label_transfer import LabelSamples, LabelTransfer, Neighbours, body_grid
from nnunet_ape.localize.localizer import check_organs, load_localizer, organ_method
from nnunet_ape.localize.margins import enlarge, stored_enlargement
from nnunet_ape.localize.retrieval import outside_to_inf
from nnunet_ape.localize.zrange import ScoredCT, combine_intervals, in_range, score_ct, z_box, z_range


def _corners_mm(volume: Volume, box: np.ndarray) -> dict:
    corners = volume.index_to_physical(box)
    return {"lo_corner_mm": corners[0].round(2).tolist(), "hi_corner_mm": corners[1].round(2).tolist(),
            "min_mm": corners.min(0).round(2).tolist(), "max_mm": corners.max(0).round(2).tolist()}


def _transfer_neighbours(localizer: dict, canon_ct: Volume, body: np.ndarray, canon_map: np.ndarray) -> Neighbours:
    """Neighbour labels of the canonical map's body grid (``body``: the canonical CT's body box) among the
    localizer's stored shot samples."""
    stored = localizer["label_transfer"]
    groups = np.asarray(stored["groups"], dtype=np.int32) if "groups" in stored else None
    samples = LabelSamples(np.asarray(stored["embeddings"], dtype=np.float32), np.asarray(stored["labels"], dtype=np.int32),
                           groups, stored.get("group_values"))
    grid = body_grid(body, canon_ct.spacing, canon_ct.shape, stored["step_mm"])
    return LabelTransfer(samples, stored["k"]).neighbours(canon_map, grid)


def _ape_boxes(entry: dict, canon_map: np.ndarray, combine: str, neighbours: Neighbours | None, threshold: float,
               spacing) -> dict:
    """Canonical boxes of one organ: ``box`` (label transfer with ``neighbours``, else or where it finds nothing the
    edge points), ``enlarged``, the edge points' own ``edge_enlarged`` and ``per_shot`` boxes; ``how`` says which
    method gave the box, ``alpha`` its enlargement (an alpha, or face margins in mm: ``spacing`` is the map's
    voxel size)."""
    edges = [np.asarray(s["edge_embeddings"], dtype=np.float64) for s in entry["shots"]]
    cuts = [np.asarray(s.get("cut_sides", np.zeros((2, 3))), dtype=bool) for s in entry["shots"]]
    box, per_shot = predict_box(edges, canon_map, combine, cuts)
    shape = canon_map.shape[:3]
    edge_alpha = stored_enlargement(entry, "ape")
    edge_enlarged = enlarge(box, edge_alpha, shape, spacing)
    how, alpha = "edge-points", edge_alpha
    found = neighbours.organ_box(entry["label"], threshold) if neighbours is not None else None
    if found is not None:
        box, how, alpha = found, "all-voxels", stored_enlargement(entry, "ape_all")
    return {"box": box, "enlarged": enlarge(box, alpha, shape, spacing), "edge_enlarged": edge_enlarged,
            "per_shot": per_shot, "how": how, "alpha": alpha}


def strided_to_full(box: np.ndarray, stride: int) -> np.ndarray:
    """A float box in the CT's own axes, in the voxels of a strided map (voxel j on CT voxel ``stride * j``) -> CT
    voxels, the high corner widened to the last CT voxel of its map cell (so that the box is not cut by the
    sampling)."""
    steps = np.full(3, float(stride))
    return np.stack([box[0] * steps, box[1] * steps + steps - 1])


def searchable_map(embedding: CanonicalMap | GridMap) -> np.ndarray:
    """The canonical APE map's array ``(X', Y', Z', C)``, +inf outside the CT's body (grown by the search margin,
    :func:`~nnunet_ape.localize.body.search_region`) so that retrieval never answers from the air around it. The
    region is found on the map's own voxels: ``embedding`` may be a map on every stride-th CT voxel, or on the model's
    grid (the CT voxel nearest each map voxel)."""
    if isinstance(embedding, GridMap):
        hu = embedding.ct.canon.array[np.ix_(*embedding.nearest_voxels())]
        return outside_to_inf(embedding.array, search_region(hu, embedding.spacing))
    step = embedding.stride
    hu = embedding.ct.canon.array[tuple(slice(first, None, step) for first in embedding.start)]
    return outside_to_inf(embedding.volume.array, search_region(hu, embedding.volume.spacing))


def predict_organ_boxes(localizer: dict, ct: Volume | CanonicalCT, embedding: CanonicalMap | GridMap | Volume | None = None,
                        scored: ScoredCT | None = None, organs: list[str] | None = None, safety_nets: bool = True) -> dict:
    """Boxes per organ on a CT (HU, any orientation, or a :class:`~nnunet_ape.canonical.CanonicalCT`), in its own
    voxel indices and in mm. APE (with ``embedding``, the map: a :class:`~nnunet_ape.embed.CanonicalMap` of the CT,
    or a map on the CT's own grid as ``embed_volume`` returns it): ``box`` (retrieved) and ``enlarged_box``; BPR
    (with ``scored``, the canonical slice scores): ``bpr_z_range`` (slices) and ``bpr_box`` (full x/y); both:
    ``combined_box`` (APE's enlarged x/y, BPR's z). ``crop_box`` is the box to crop with: the combined one when both
    are there, else the enlarged APE or the BPR box. ``embedding`` may be a map on every stride-th voxel or on the
    model's grid (:class:`~nnunet_ape.embed.GridMap`; edge-point localizers only): boxes are still in the CT's voxels,
    within about one map cell of the full map's. Boxes are found in canonical order and converted to the
    CT's own indices once each, here. ``crop_boxes_voxels``: the crop box of every method this CT allows (the
    alternatives to the organ's own method, by name as in :data:`~nnunet_ape.localize.choice.CANDIDATES`). ``safety_net``: True where
    the organ's crop is the union of its method's and the body box's because they disagreed beyond what the shots
    showed (:func:`~nnunet_ape.localize.choice.safety_net`; ``safety_nets`` False turns it off), with
    ``inside_body_box`` the fraction of the method's crop inside the body box's. ``placed``: False
    when the localizer could not place the organ on this CT (no slice scores in its range, or a crop box wholly
    outside the image); its boxes are then only the nearest guess."""
    names = check_organs(localizer, organs)
    canon = canonical_ct(ct)
    ct = canon.source
    perm, flip = canon.orientation.perm, canon.orientation.flip
    canon_shape = canon.canon.shape
    if isinstance(embedding, Volume):  # a map on the CT's own grid
        embedding = CanonicalMap.from_source_grid(embedding, canon)
    canon_map = searchable_map(embedding) if embedding is not None else None
    map_spacing = None if embedding is None else embedding.spacing if isinstance(embedding, GridMap) else embedding.volume.spacing
    body = body_box(canon.canon.array)  # every organ's alternative and safety net, whatever its method
    neighbours = None
    if canon_map is not None and localizer.get("ape_boxes") == "all-voxels":
        if isinstance(embedding, GridMap) or embedding.stride != 1:
            raise ValueError("the all-voxels localizer needs the APE map on the CT's own grid (stride 1)")
        neighbours = _transfer_neighbours(localizer, canon.canon, body, canon_map)
    native = canon.box_to_source
    from_map = native
    if isinstance(embedding, GridMap):  # a map on the model's grid: boxes in CT voxels
        from_map = lambda b: native(embedding.box_to_canonical(b))  # noqa: E731
    elif embedding is not None and embedding.stride != 1:  # a map on every stride-th voxel: boxes in CT voxels
        strided_shape = embedding.source_shape
        from_map = lambda b: strided_to_full(box_from_canonical(b, perm, flip, strided_shape), embedding.stride)  # noqa: E731
    methods = {organ: organ_method(localizer["organs"][organ], localizer)
               for organ in names}
    out = {}
    for organ in names:
        entry = localizer["organs"][organ]
        result: dict = {"label": entry["label"], "method": methods[organ]}
        crops: dict[str, np.ndarray] = {}  # native (CT voxel) crop box of each method this CT allows
        placed = True
        if canon_map is not None and "shots" in entry:
            found = _ape_boxes(entry, canon_map, localizer["combine"], neighbours,
                               localizer.get("label_transfer", {}).get("threshold", 0), map_spacing)
            box, big = from_map(found["box"]), from_map(found["enlarged"])
            enlargement = {"margin_mm": np.round(found["alpha"], 2).tolist()} if np.ndim(found["alpha"]) else {"alpha": found["alpha"]}
            result.update({"ape_boxes": found["how"], **enlargement, "box_voxels": box.round(2).tolist(),
                           "box": _corners_mm(ct, box), "enlarged_box_voxels": big.round(2).tolist(),
                           "enlarged_box": _corners_mm(ct, big),
                           "edge_points_per_shot_box_voxels": [from_map(b).tolist() for b in found["per_shot"]]})
            crops["ape"] = from_map(found["edge_enlarged"])
            crops["ape_all"] = big
        if "body_box" in entry:
            canon_body = enlarge(box_in_body(entry["body_box"]["relative"], body), stored_enlargement(entry, "body_box"),
                                 canon_shape, canon.canon.spacing)
            crops["body_box"] = native(canon_body)
            result.update({"body_box_voxels": crops["body_box"].round(2).tolist(), "body_box": _corners_mm(ct, crops["body_box"])})
        if scored is not None and "bpr" in entry:
            interval = combine_intervals([np.asarray(iv) for iv in entry["bpr"]["intervals"]], localizer["combine"])
            low, high = z_range(scored.scores, interval, entry["bpr"]["margin"])
            bpr_placed = bool(in_range(scored.scores, interval, entry["bpr"]["margin"]).any())
            canon_z = z_box(canon_shape, low, high)
            crops["bpr_z"] = native(canon_z)
            result.update({"bpr_margin": entry["bpr"]["margin"], "bpr_z_range": [low, high],
                           "bpr_box_voxels": crops["bpr_z"].round(2).tolist(), "bpr_box": _corners_mm(ct, crops["bpr_z"])})
            for combined, xy in (("ape_bpr", "ape_all"), ("body_bpr", "body_box")):
                if xy in crops:
                    crops[combined] = native(with_z(canon.box_to_canonical(crops[xy]), low, high))
            if "ape_bpr" in crops:
                result.update({"combined_box_voxels": crops["ape_bpr"].round(2).tolist(), "combined_box": _corners_mm(ct, crops["ape_bpr"])})
            placed = bpr_placed or "bpr" not in methods[organ]
        if methods[organ] not in crops:
            raise InputError(f"organ '{organ}': its method {methods[organ]} needs a model this localization was not given")
        crop = crops[methods[organ]]
        if "safety_net" in entry and "body_box" in crops and safety_nets:
            net = entry["safety_net"]  # without "quantile": the shots' lowest agreement, used with the old slack
            crop, inside, used = safety_net(crop, crops["body_box"], net["agreement"], 1.0 if "quantile" in net else SAFETY_NET_SLACK)
            result.update({"inside_body_box": None if inside is None else round(inside, 4), "safety_net": used})
        placed = placed and overlaps_image(crop, ct.shape)
        result.update({"crop_box_voxels": crop.round(2).tolist(), "crop_box": _corners_mm(ct, crop), "placed": placed,
                       "crop_boxes_voxels": {m: b.round(2).tolist() for m, b in crops.items()}})
        out[organ] = result
    return out


def localize_volume(localizer: dict, ct: Volume | CanonicalCT, ape_model: nn.Module | None = None,
                    bpr_model: nn.Module | None = None, device: str = "cpu", organs: list[str] | None = None) -> dict:
    """Embed and/or score a CT (HU, any orientation) with the localizer's models (from :func:`load_localizer`'s
    checkpoints) and predict its organ boxes (:func:`predict_organ_boxes`), all in canonical order: the CT is
    brought there once, the boxes back once."""
    ct = canonical_ct(ct)
    embedding = scored = None
    if ape_model is not None:
        settings = EmbedSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in localizer["embed_settings"].items()})
        embedding = canonical_map(network_map(ape_model, ct, settings, device=device, progress=False), settings)
    if bpr_model is not None:
        scored = score_ct(bpr_model, ct, device)
    return predict_organ_boxes(localizer, ct, embedding, scored, organs)
