"""Everything that knows nnU-Net's files and internals: raw datasets, crop datasets and pasting predictions back.
The rest of the library stays free of nnU-Net imports.

Importing this package registers the reader of ``nnUNetTrainerAPEPretrain`` checkpoints with
:mod:`nnunet_ape.checkpoint`, so that all nnU-Net code (and the CLI, which imports it) can take them as APE models.
"""

from nnunet_ape.nnunet.checkpoint_reader import register_nnunet_checkpoint_reader

register_nnunet_checkpoint_reader()
