"""Hugging Face interop: `export_hf` (run -> transformers folder) and `import_hf` (folder -> run).

Names and config fields live in `slmforge.models.hf`; neither direction needs `transformers` installed.
"""

from slmforge.interop.export import export_hf
from slmforge.interop.import_hf import import_hf

__all__ = ["export_hf", "import_hf"]
