"""The one record type every dataset loader returns (SafeTag, the toy world, the eval benchmarks)."""
from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Record:
    id: str                      # stable id: "<source>/<row or file id>"
    prompt: str                  # the user's question as written in the source (no step-guided instruction)
    images: list[Image.Image]    # decoded RGB images, in the order they appear in the prompt
    labels: dict = field(default_factory=dict)   # reference fields, e.g. image_tag/text_tag/combine_tag
    subset: str = ""             # source or benchmark subset (e.g. "compositional", "01-Illegal_Activitiy/SD")
    meta: dict = field(default_factory=dict)     # anything else the source carries (kept for reports)
