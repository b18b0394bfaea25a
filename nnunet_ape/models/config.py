"""Network settings that the command line lists (``--model``, ``--trunk``), kept free of torch so that ``--help``
and usage errors answer at once; the networks themselves are in :mod:`nnunet_ape.models.ape` and
:mod:`nnunet_ape.models.bpr`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

STEM_STRIDE = 4  # the stem's patchify convolution; the head upsamples by the same factor


@dataclass
class APEConfig:
    """Architecture of an APE network.

    widths: channels per resolution level; level 0 is at stride 4 (after the stem), level i at 4 * 2**i.
    convs_per_level: 3x3x3 convolutions (BN + LeakyReLU) per level in encoder and decoder.
    embed_dim: output channels (3 for APE).
    """

    widths: tuple[int, ...] = (32, 64, 128, 256)
    convs_per_level: int = 2
    embed_dim: int = 3

    @property
    def divisor(self) -> int:
        """Input sizes are padded internally to a multiple of this."""
        return STEM_STRIDE * 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict:
        """The settings as JSON-ready plain values (tuples as lists), as checkpoints store them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "APEConfig":
        """The inverse of :meth:`to_dict`."""
        return cls(widths=tuple(d["widths"]), convs_per_level=int(d["convs_per_level"]), embed_dim=int(d["embed_dim"]))


PRESETS: dict[str, APEConfig] = {
    # trains on a laptop CPU in minutes: tests and the demo
    "tiny": APEConfig(widths=(8, 16, 32), convs_per_level=1),
    "small": APEConfig(widths=(16, 32, 64, 128), convs_per_level=2),
    # sized for real use on a GPU, like the paper's model
    "base": APEConfig(widths=(32, 64, 128, 256, 320), convs_per_level=2),
}

# BPR trunk name -> timm model name ("" for our small CNN)
TRUNKS: dict[str, str] = {
    "vgg16": "vgg16",  # the reference implementation's trunk (bpreg)
    "resnet": "resnet18",
    "densenet": "densenet121",
    "convnext": "convnext_atto",
    "efficientnet": "efficientnet_b0",
    "tiny": "",
}
