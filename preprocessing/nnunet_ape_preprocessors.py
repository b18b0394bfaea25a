"""Re-export of the APE preprocessor (run by ``nnunet-ape preprocess``; nnU-Net looks up preprocessors only
inside its own package)."""

from nnunet_ape.nnunet.preprocessor import nnUNetAPEPreprocessor  # noqa: F401
