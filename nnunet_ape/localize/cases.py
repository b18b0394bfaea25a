"""Old home of :mod:`nnunet_ape.cases` (labeled cases moved to the I/O floor, issue 32); kept so that scripts
written against it still import. New code imports :mod:`nnunet_ape.cases`."""

from nnunet_ape.cases import (LabeledCase, cases_from_folders, cases_from_nnunet, label_values, read_case,  # noqa: F401
                              read_label, read_label_names, remap_labels, resolve_organs)
