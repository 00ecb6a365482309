"""The modelling code of a parallel-merged checkpoint: copied into the output directory (``auto_map``).

:mod:`surgery.widen` writes ``configuration_surgery_parallel.py`` and
``modeling_surgery_parallel.py`` into every model directory it makes, with the line
``BASE_MODEL_TYPE = "..."`` set to the source architecture. The files need only ``torch`` and
``transformers`` (not layer-surgery) and derive every class from the base architecture's own.
"""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent
SHIPPED_FILES = ("configuration_surgery_parallel.py", "modeling_surgery_parallel.py")
BASE_LINE = 'BASE_MODEL_TYPE = "llama"'
