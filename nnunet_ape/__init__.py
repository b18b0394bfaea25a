"""nnunet-ape: Anatomical Positional Embeddings for anatomically localized CT segmentation with nnU-Net v2."""

__version__ = "0.1.0"
