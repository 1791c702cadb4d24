"""The researcher's daily loop: identify tonight's photos against the current gallery,
look at the matches, enroll the confirmed animals as a new gallery version.

    from whale_ml.gallery import load_version
    from whale_ml.gallery.models import resolve_models
    from whale_ml.identify import identify_photos, write_report, enroll

The gallery itself (versions, lineage, the enrollment ledger) is :mod:`whale_ml.gallery`;
the model registry is :mod:`whale_ml.registry`.
"""

from whale_ml.identify.enroll import enroll, read_confirmed
from whale_ml.identify.matching import format_text, identify_photos
from whale_ml.identify.photos import expand_inputs
from whale_ml.identify.report import write_report

__all__ = ["enroll", "expand_inputs", "format_text", "identify_photos", "read_confirmed", "write_report"]
