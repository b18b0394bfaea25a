"""The head-and-neck cohort's split, shared by every benchmark on it (../shared/data/README.md).

Test cases: hn_169..hn_214 (40 CTs; case numbers have gaps), used only for the final figures: never for
pretraining, fitting a localizer or training nnU-Net. Training cases: the other 163 (hn_001..hn_168, hn_215..hn_239).
"""

from __future__ import annotations

import os
from pathlib import Path

# $NNUNET_APE_HEADNECK: the dataset elsewhere (a GPU machine gets a copy inside the checkout)
HEADNECK = Path(os.environ.get("NNUNET_APE_HEADNECK",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset901_HeadNeckCT"))
TEST_NUMBERS = range(169, 215)


def is_test_case(name: str) -> bool:
    """Whether case ``name`` (``hn_NNN``) belongs to the held-out test cases."""
    return int(name.rsplit("_", 1)[-1]) in TEST_NUMBERS


def split(cases: list) -> tuple[list, list]:
    """(training, test) cases, each sorted by name; ``cases`` are objects with a ``name`` (``hn_NNN``)."""
    ordered = sorted(cases, key=lambda c: c.name)
    return [c for c in ordered if not is_test_case(c.name)], [c for c in ordered if is_test_case(c.name)]
