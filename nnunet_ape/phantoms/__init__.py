"""Synthetic CT-like phantoms with organ labels.

Each seed defines one virtual patient (a body from the pelvis, z = 0, up to the
lung apex, z ~ 650 mm, with random size, shape and organ placement) and one
acquisition of it (a random z window, spacing, origin, direction and noise).

Coordinates follow SimpleITK / DICOM LPS: +x = patient left, +y = posterior,
+z = superior. Numpy arrays are indexed [z, y, x] as returned by
``SimpleITK.GetArrayFromImage``.

Shapes are described in a *template* frame (mm of an average patient, body
centred on x = y = 0). A voxel at body coordinate ``p`` (mm) is evaluated at
template coordinate ``p / scale``, so the overall patient scale needs no special
care anywhere else. All shapes are implicit functions evaluated with numpy
broadcasting on axis-aligned sub-boxes of the voxel grid.
"""


from nnunet_ape.phantoms.cohort import anatomical_z, make_phantom, write_cohort
from nnunet_ape.phantoms.template import MAX_VOXELS, ORGAN_LABELS

__all__ = ["MAX_VOXELS", "ORGAN_LABELS", "anatomical_z", "make_phantom", "write_cohort"]
