import os
import sys
from pathlib import Path

# gptqmodel torch.compiles its dequantize kernel on first use; on 2 CPU cores compiling costs a minute
# per test module and buys nothing for tiny models.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).parent))
