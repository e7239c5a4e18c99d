"""Writes the ~50M-parameter Llama used in BENCHMARKS.md (random weights, fixed seed).

    python benchmarks/make_llama50m.py OUT_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import make_checkpoint  # noqa: E402

make_checkpoint(Path(sys.argv[1]), "llama", vocab_size=32000, hidden_size=512, intermediate_size=1536,
                num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
