"""Suite-wide settings: nothing may reach a model hub while testing."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# test helpers (tiny models) importable as plain modules
sys.path.insert(0, str(Path(__file__).parent / "speculation"))
