"""The painters: each fills one group of tissues on the canvas, in painting order (later ones overwrite earlier)."""

from __future__ import annotations

import numpy as np

from nnunet_ape.phantoms.template import ORGAN_LABELS, _UNLABELLED
from nnunet_ape.phantoms.patient import _Organ, _Patient, _interp, _rotation
from nnunet_ape.phantoms.canvas import _Canvas, _capsule, _ellipse_q, _organ_mask

# ---------------------------------------------------------------------------
# Painters, in painting order (later ones overwrite earlier ones)
# ---------------------------------------------------------------------------
def _paint_body(c: _Canvas, pat: _Patient) -> None:
    """Skin/fat, muscle wall and cavity; the cavity mask is stored on the canvas."""
    reg = c.region()
    prof, tex = pat.profile, c.field("tex", reg)
    skin = _ellipse_q(reg, *prof.skin_axes(reg.z)) <= 1
    c.paint(reg, skin, -100 + 10 * tex)
    muscle = _ellipse_q(reg, *prof.muscle_axes(reg.z)) <= 1
    c.paint(reg, muscle, 50 + 8 * tex)
    c.cavity[...] = _ellipse_q(reg, *prof.cavity_axes(reg.z)) <= 1
    # Chest: mediastinal fat (the lungs and heart fill most of it later).
    c.paint(reg, c.cavity & (reg.z > 440), -80 + 15 * tex)


def _paint_abdomen(c: _Canvas, pat: _Patient) -> None:
    """Abdominal/pelvic cavity: bowel loops, gas, mesenteric and retroperitoneal fat."""
    reg = c.region(hi=(np.inf, np.inf, 440.0))
    if reg is None:
        return
    tex, bowel, shape = c.field("tex", reg), c.field("bowel", reg), c.field("shape", reg)
    # Bowel loops are the blobs of one smooth field (wall, then fluid or gas
    # inside); between them mesenteric fat or soft tissue.
    hu = np.where(c.field("fat", reg) > pat.visceral_fat, np.float32(-95), np.float32(35))
    hu = np.where(bowel > 0.1, np.float32(60), hu)
    lumen = bowel > 0.35
    hu = np.where(lumen, np.float32(15), hu)
    hu = np.where(lumen & (c.field("gas", reg) > 0.8), np.float32(-980), hu)
    hu += 8 * tex
    # Retroperitoneum (around the spine, sweeping back laterally): fat, no bowel.
    border = pat.spine.y(reg.z) - 40 + 0.003 * reg.x**2 + 10 * shape
    hu = np.where((reg.y > border) & (reg.z > 120), -90 + 10 * tex, hu)
    c.paint(reg, c.cavity[reg.sl], hu)


def _paint_colon(c: _Canvas, pat: _Patient) -> None:
    """Ascending, transverse and descending colon and rectum with mottled stool/gas."""
    o = pat.organs
    xr, xl = o["liver"].center[0] - 40, o["spleen"].center[0] + 10
    ys = float(pat.spine.y(np.float32(80.0)))
    segments = [((xr, -5, 150), (xr, -5, 320), 22), ((xr, -30, 330), (xl, -30, 345), 20),
                ((xl, 12, 180), (xl, 12, 355), 20), ((0, ys - 38, 20), (0, ys - 30, 140), 17)]
    for i, (p0, p1, r) in enumerate(segments):
        cap = _capsule(c, p0, p1, r)
        if cap is None:
            continue
        reg, d2 = cap
        gas = c.field("gas", reg) > (0.8 if i == 3 else -0.1)  # rectum: little gas
        inner = np.where(gas, np.float32(-950), 20 + 25 * c.field("tex", reg))
        c.paint(reg, (d2 <= r * r) & c.cavity[reg.sl], 45)
        c.paint(reg, (d2 <= (r - 3) ** 2) & c.cavity[reg.sl], inner)


def _paint_lungs(c: _Canvas, pat: _Patient) -> None:
    """Lungs with gravity gradient and vessels, then trachea and main bronchi."""
    for name, side in (("lung_right", -1), ("lung_left", 1)):
        organ = pat.organs[name]
        got = _organ_mask(c, organ, wobble=0.08)
        if got is None:
            continue
        reg, mask, _ = got
        mask &= side * reg.x > 6  # mediastinum
        hu = pat.hu["lung"] + 0.5 * (reg.y - organ.center[1]) + 12 * c.field("tex", reg)
        # Vessels: where two smooth fields are both near zero (curves in 3D),
        # thicker towards the hilum.
        hilum = (side * 45.0, 5.0, 520.0)
        d2 = (reg.x - hilum[0]) ** 2 + (reg.y - hilum[1]) ** 2 + (reg.z - hilum[2]) ** 2
        width = 0.12 + 0.22 * np.exp(d2 / (-2 * 50.0**2))
        vessel = ((np.abs(c.field("vessel_a", reg)) < width)
                  & (np.abs(c.field("vessel_b", reg)) < width))
        hu = np.where(vessel, np.float32(40), hu)
        c.paint(reg, mask, hu, ORGAN_LABELS[name])
    y_tr = float(pat.spine.y(np.float32(600.0))) - 38
    for p0, p1, r in (((0, y_tr, 560), (0, y_tr, 720), 9.0),
                      ((0, y_tr, 562), (-45, y_tr + 10, 525), 6.5),
                      ((0, y_tr, 562), (45, y_tr + 10, 525), 6.0)):
        cap = _capsule(c, p0, p1, r)
        if cap is not None:
            reg, d2 = cap
            c.paint(reg, (d2 <= (r + 1.5) ** 2) & c.cavity[reg.sl], 40, _UNLABELLED)
            c.paint(reg, d2 <= r * r, -990)


def _paint_heart(c: _Canvas, pat: _Patient) -> None:
    """Heart: pericardial fat, myocardium and contrast-filled chambers."""
    got = _organ_mask(c, pat.organs["heart"], wobble=0.05)
    if got is None:
        return
    reg, mask, q = got
    c.paint(reg, (q <= 1.25) & c.cavity[reg.sl], -90, _UNLABELLED)
    c.paint(reg, mask, 45)
    c.paint(reg, mask & (q < 0.5), pat.hu["aorta"] - 30)


def _paint_stomach(c: _Canvas, pat: _Patient) -> None:
    """Stomach with wall, fluid and an anterior air pocket (patient supine)."""
    organ = pat.organs["stomach"]
    got = _organ_mask(c, organ)
    if got is None:
        return
    reg, mask, q = got
    c.paint(reg, mask, 50, _UNLABELLED)
    inner = mask & (q < 0.8)
    c.paint(reg, inner, 15)
    c.paint(reg, inner & (reg.y < organ.center[1] - 0.2 * organ.semi[1]), -990)


def _paint_muscles(c: _Canvas, pat: _Patient) -> None:
    """Gluteal, psoas and erector spinae muscles."""
    sp = pat.spine
    for side in (-1, 1):
        glut = _Organ((side * 85.0, 55.0, 95.0), (62.0, 45.0, 95.0), _rotation(side * 20, 0))
        got = _organ_mask(c, glut, wobble=0.1)
        if got is not None:
            c.paint(got[0], got[1], 50 + 6 * c.field("tex", got[0]), _UNLABELLED)
    reg = c.region((-130, -np.inf, 100), (130, np.inf, 650))
    if reg is None:
        return
    ys, z = sp.y(reg.z), reg.z
    for side in (-1, 1):
        # Psoas: from L1 (close to the vertebrae) down and out to the pelvic brim.
        px = side * _interp(z, [110, 340], [62, 28])
        py = ys + _interp(z, [110, 340], [-22, 0])
        pr = _interp(z, [100, 110, 220, 340, 350], [0, 18, 24, 10, 0])
        psoas = (reg.x - px) ** 2 + (reg.y - py) ** 2 <= pr**2
        c.paint(reg, psoas, 50 + 6 * c.field("tex", reg), _UNLABELLED)
        ex, ey = side * _interp(z, [200, 500], [40, 33]), ys + sp.ry(z) + 36
        erector = (((reg.x - ex) / _interp(z, [200, 500], [30, 22])) ** 2
                   + ((reg.y - ey) / _interp(z, [200, 500], [24, 17])) ** 2) <= 1
        c.paint(reg, erector, 50 + 6 * c.field("tex", reg), _UNLABELLED)


def _paint_solid_organs(c: _Canvas, pat: _Patient) -> None:
    """Liver (both lobes, with portal vessels), spleen, kidneys and bladder."""
    for name in ("kidney_right", "kidney_left"):  # perirenal fat first
        o = pat.organs[name]
        fat = _Organ(o.center, tuple(s * 1.3 + 6 for s in o.semi), o.rot)
        got = _organ_mask(c, fat)
        if got is not None:
            c.paint(got[0], got[1], -95, _UNLABELLED)
    for name in ("liver", "liver_left_lobe"):
        got = _organ_mask(c, pat.organs[name])
        if got is not None:
            reg, mask, _ = got
            vessel = ((np.abs(c.field("vessel_a", reg)) < 0.12)
                      & (np.abs(c.field("vessel_b", reg)) < 0.12))
            hu = np.where(vessel, np.float32(pat.hu["vein"]),
                          pat.hu["liver"] + 6 * c.field("tex", reg))
            c.paint(reg, mask, hu, ORGAN_LABELS["liver"])
    got = _organ_mask(c, pat.organs["spleen"])
    if got is not None:
        c.paint(got[0], got[1], pat.hu["spleen"] + 6 * c.field("tex", got[0]),
                ORGAN_LABELS["spleen"])
    for name in ("kidney_right", "kidney_left"):
        got = _organ_mask(c, pat.organs[name], wobble=0.06)
        if got is not None:
            reg, mask, q = got
            hu = np.where(q < 0.5, np.float32(pat.hu["kidney_medulla"]),
                          np.float32(pat.hu["kidney_cortex"]))
            c.paint(reg, mask, hu + 6 * c.field("tex", reg), ORGAN_LABELS[name])
    got = _organ_mask(c, pat.organs["bladder"], wobble=0.06)
    if got is not None:
        c.paint(got[0], got[1], 10 + 4 * c.field("tex", got[0]), ORGAN_LABELS["bladder"])


def _paint_vessels(c: _Canvas, pat: _Patient) -> None:
    """Aorta (labelled) with arch and iliac arteries, and the inferior vena cava."""
    sp = pat.spine
    zs = np.array([175, 300, 380, 450, 560], np.float32)
    ant = sp.y(zs) - sp.ry(zs)  # anterior surface of the vertebral bodies
    ax = np.array([6, 12, 15, 22, 24], np.float32) + sp.x(zs)
    ay = ant + np.array([-12, -12, -10, 0, 8], np.float32)
    reg = c.region((-60, -np.inf, 130), (60, np.inf, 565))
    if reg is not None:
        z = reg.z
        d2 = (reg.x - _interp(z, zs, ax)) ** 2 + (reg.y - _interp(z, zs, ay)) ** 2
        ivc_x, ivc_y = _interp(z, zs, ax - 34), _interp(z, zs, ay + 2)
        ivc = ((reg.x - ivc_x) ** 2 + (reg.y - ivc_y) ** 2 <= 11**2) & (z > 140) & (z < 470)
        c.paint(reg, ivc, pat.hu["vein"], _UNLABELLED)
        aorta = (d2 <= _interp(z, [175, 560], [9.5, 12.5]) ** 2) & (z >= 175) & (z <= 560)
        c.paint(reg, aorta, pat.hu["aorta"], ORGAN_LABELS["aorta"])
    asc = (float(ax[-1]) - 18.0, float(ant[-1]) - 62.0)
    _paint_arch(c, pat, (float(ax[-1]), float(ay[-1])), asc)
    for side in (-1, 1):  # common and external iliac arteries
        knee = (side * 45.0, float(ay[0]) - 5, 105.0)
        for p0, p1 in (((float(ax[0]), float(ay[0]), 178.0), knee),
                       (knee, (side * 80.0, float(ay[0]) - 30, 30.0))):
            cap = _capsule(c, p0, p1, 6.0)
            if cap is not None:
                c.paint(cap[0], cap[1] <= 36.0, pat.hu["aorta"], _UNLABELLED)


def _paint_arch(c: _Canvas, pat: _Patient, desc: tuple[float, float],
                asc: tuple[float, float]) -> None:
    """Aortic arch (half torus over z = 560) and ascending aorta down to the heart."""
    z_top, r = 560.0, 13.0
    cap = _capsule(c, (*asc, 485.0), (*asc, z_top), r)
    if cap is not None:
        c.paint(cap[0], cap[1] <= r * r, pat.hu["aorta"], ORGAN_LABELS["aorta"])
    mid = np.array([(desc[0] + asc[0]) / 2, (desc[1] + asc[1]) / 2])
    u = np.array(desc) - np.array(asc)
    big_r = float(np.linalg.norm(u)) / 2
    u /= np.linalg.norm(u)
    reg = c.region((float(mid[0]) - big_r - r, float(mid[1]) - big_r - r, z_top),
                   (float(mid[0]) + big_r + r, float(mid[1]) + big_r + r, z_top + big_r + r))
    if reg is None:
        return
    s = (reg.x - float(mid[0])) * float(u[0]) + (reg.y - float(mid[1])) * float(u[1])
    v = (reg.x - float(mid[0])) * float(-u[1]) + (reg.y - float(mid[1])) * float(u[0])
    dz = reg.z - z_top
    torus = (np.sqrt(s * s + dz * dz) - big_r) ** 2 + v * v <= r * r
    c.paint(reg, torus, pat.hu["aorta"], ORGAN_LABELS["aorta"])


def _paint_spine(c: _Canvas, pat: _Patient) -> None:
    """Sacrum and vertebrae (bodies with cortex, arches, processes), discs, canal."""
    sp = pat.spine
    ymin, ymax = min(sp.y_ctrl) - 30, max(sp.y_ctrl) + 75
    reg = c.region((-60, ymin, sp.sacrum_lo), (60, ymax, np.inf))
    if reg is None:
        return
    z = reg.z
    xc, yc, rx, ry = sp.x(z), sp.y(z), sp.rx(z), sp.ry(z)
    lo, hi = np.array(sp.body_lo), np.array(sp.body_hi)
    k = np.clip(np.searchsorted(hi, z), 0, len(hi) - 1)
    in_body = (z >= lo[k]) & (z <= hi[k])
    t = np.clip((z - lo[k]) / (hi[k] - lo[k]), 0, 1)
    end_dist = np.minimum(z - lo[k], hi[k] - z)  # to the nearest endplate, mm
    lumbar = k < sp.n_lumbar
    in_sacrum = z < sp.s1_top
    in_disc = ~in_body & ~in_sacrum

    # Sacrum: wide and flat, tapering down to the coccyx.
    srx = _interp(z, [sp.sacrum_lo, sp.s1_top], [12, 50])
    sry = _interp(z, [sp.sacrum_lo, sp.s1_top], [9, 18])
    rx, ry = np.where(in_sacrum, srx, rx), np.where(in_sacrum, sry, ry)
    q = ((reg.x - xc) / rx) ** 2 + ((reg.y - yc) / ry) ** 2
    bone = pat.hu["bone"] + 30 * c.field("tex", reg)
    body = (q <= 1) & (in_body | in_sacrum)
    rim = (q >= (1 - 2.5 / ry) ** 2) | ((end_dist < 1.5) & in_body)
    c.paint(reg, body, np.where(rim, np.float32(900), bone), ORGAN_LABELS["spine"])
    c.paint(reg, (q <= 1) & in_disc, 85, _UNLABELLED)

    # Posterior elements around the spinal canal.
    r_can = np.where(lumbar, np.float32(9), np.float32(7.5))
    cy = yc + ry + r_can + 2
    dc2 = (reg.x - xc) ** 2 + (reg.y - cy) ** 2
    arch = (dc2 <= (r_can + 5) ** 2) & (reg.y >= yc + ry - 4) & in_body & (t > 0.1) & (t < 0.9)
    spin_len = np.where(lumbar, np.float32(28), np.float32(17))
    spinous = ((np.abs(reg.x - xc) <= 3.5) & (reg.y >= cy) & (reg.y <= cy + r_can + 3 + spin_len)
               & in_body & (t > 0.2) & (t < 0.85))
    tp_y = np.where(lumbar, cy - 3, cy + 4)
    tp_w = np.where(lumbar, np.float32(45), np.float32(32))
    transverse = ((np.abs(reg.y - tp_y) <= 4.5) & (np.abs(reg.x - xc) <= tp_w) & in_body
                  & (t > 0.35) & (t < 0.72))
    c.paint(reg, arch | spinous | transverse, np.float32(650) + 30 * c.field("tex", reg),
            ORGAN_LABELS["spine"])
    canal = (dc2 <= r_can**2) & (reg.y >= yc + ry) & ~in_sacrum
    c.paint(reg, canal, 25, _UNLABELLED)


# Ribs T12 .. T1: how far round they reach (rad from the back), bone then cartilage.
_RIB_END = np.array([1.3, 1.7, 2.2, 2.35, 2.5, 2.6, 2.65, 2.7, 2.7, 2.65, 2.6, 2.5])
_CARTILAGE_END = np.array([1.3, 1.7, 2.6, 2.7, 2.8, 2.95, 2.95, 2.95, 2.95, 2.95, 2.95, 2.9])
_RIB_START = 0.3


def _paint_ribs(c: _Canvas, pat: _Patient) -> None:
    """Twelve pairs of ribs hugging the cavity wall, sloping down anteriorly."""
    sp = pat.spine
    z_post = (np.array(sp.body_lo[sp.n_lumbar:]) + np.array(sp.body_hi[sp.n_lumbar:])) / 2
    reg = c.region((-np.inf, -np.inf, z_post[0] - pat.rib_drop - 10),
                   (np.inf, np.inf, z_post[-1] + 10))
    if reg is None:
        return
    theta = np.arctan2(np.abs(reg.x), reg.y)  # 0 at the back, pi at the front
    r = np.sqrt(reg.x**2 + reg.y**2)
    # Radial distance (mm) outside the cavity boundary, approximately.
    rho = np.sqrt(_ellipse_q(reg, *pat.profile.cavity_axes(reg.z)))
    d = r * (1 - 1 / np.maximum(rho, 1e-3))
    g = np.clip((theta - _RIB_START) / (np.pi - _RIB_START), 0, 1) ** 1.3
    z_flat = reg.z + pat.rib_drop * g  # undo the anterior slope
    k = np.clip(np.rint(np.interp(z_flat, z_post, np.arange(z_post.size))), 0, z_post.size - 1)
    k = k.astype(np.intp)
    dz = z_flat - z_post[k].astype(np.float32)
    tube = (dz / 5.5) ** 2 + ((d - 1.0) / 4.0) ** 2 <= 1
    started = theta >= _RIB_START
    bone = tube & started & (theta <= _RIB_END[k])
    cartilage = tube & (theta > _RIB_END[k]) & (theta <= _CARTILAGE_END[k])
    c.paint(reg, cartilage, 120, _UNLABELLED)
    c.paint(reg, bone, 650 + 40 * c.field("tex", reg), _UNLABELLED)
    _paint_sternum(c, pat)
    _paint_scapulae(c, pat)


def _paint_sternum(c: _Canvas, pat: _Patient) -> None:
    """Sternum in the anterior chest wall, widening into the manubrium at the top."""
    reg = c.region((-30, -np.inf, 440), (30, 0, 610))
    if reg is None:
        return
    _, ba, _ = pat.profile.cavity_axes(reg.z)
    half_w = _interp(reg.z, [440, 570, 590, 610], [8, 14, 24, 24])
    sternum = (np.abs(reg.x) <= half_w) & (np.abs(reg.y + ba + 4) <= 6)
    c.paint(reg, sternum, 420, _UNLABELLED)


def _paint_scapulae(c: _Canvas, pat: _Patient) -> None:
    """Shoulder blades: thin curved plates in the posterior chest wall."""
    reg = c.region((-135, 0, 470), (135, np.inf, 625))
    if reg is None:
        return
    _, _, bp = pat.profile.muscle_axes(reg.z)
    ax = np.abs(reg.x)
    y_plate = bp - 14 - 0.005 * (ax - 85) ** 2
    half_w = 40 * np.clip((reg.z - 470) / 60, 0.25, 1)
    plate = (np.abs(reg.y - y_plate) <= 3.5) & (np.abs(ax - 85) <= half_w)
    c.paint(reg, plate, 500, _UNLABELLED)


def _paint_pelvis(c: _Canvas, pat: _Patient) -> None:
    """Iliac wings, acetabula, femoral heads/necks/shafts, pubic and ischial rami."""
    reg = c.region((-160, -np.inf, -np.inf), (160, np.inf, 225))
    if reg is None:
        return
    z = reg.z
    zc = [95.0, 150.0, 215.0]
    r = _interp(z, zc, [30, 70, 95])
    half_t = _interp(z, zc, [7, 5, 4])
    in_z = (z >= 95) & (z <= 212)
    for side in (-1, 1):
        cx, cy = side * _interp(z, zc, [85, 55, 40]), _interp(z, zc, [-10, -15, -20])
        dx, dy = side * (reg.x - cx), reg.y - cy
        phi = np.arctan2(dx, dy)  # 0 towards the back, growing laterally
        wing = (np.abs(np.sqrt(dx * dx + dy * dy) - r) <= half_t) & (phi > 0.1) & (phi < 2.0)
        c.paint(reg, wing & in_z, 520 + 40 * c.field("tex", reg), _UNLABELLED)
    for side in (-1, 1):
        head = (side * 88.0, -12.0, 65.0)
        troch = (side * 122.0, -5.0, 50.0)
        caps = [((side * 88.0, -12.0, 66.0), (side * 88.0, -12.0, 64.0), 32.0, 26.0),  # acetabulum
                (head, head, 23.0, 0.0),
                (head, troch, 14.0, 0.0),
                (troch, (side * 112.0, 0.0, -80.0), 14.0, 0.0),
                ((side * 75.0, -35.0, 62.0), (side * 12.0, -72.0, 50.0), 9.0, 0.0),
                ((side * 80.0, 5.0, 55.0), (side * 55.0, 30.0, 15.0), 12.0, 0.0)]
        for p0, p1, rad, hole in caps:
            cap = _capsule(c, p0, p1, rad)
            if cap is None:
                continue
            creg, d2 = cap
            mask = (d2 <= rad * rad) & (d2 > hole * hole)
            if hole:  # acetabular roof: only the upper, medial half of the shell
                mask &= (creg.z > 55) & (side * creg.x < side * p0[0] + 8)
            c.paint(creg, mask, 520 + 40 * c.field("tex", creg), _UNLABELLED)


_PAINTERS = (_paint_body, _paint_abdomen, _paint_colon, _paint_lungs, _paint_heart,
             _paint_stomach, _paint_muscles, _paint_solid_organs, _paint_vessels,
             _paint_pelvis, _paint_spine, _paint_ribs)
