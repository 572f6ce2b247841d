"""What README says about loading a saved model back (issue 17): `AutoModelForCausalLM` works after
`import condensation` registers the model type, not before; `LlamaForCausalLM` reads the same weights."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD = """
import sys, transformers
try:
    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
    print("auto: loaded")
except (ValueError, KeyError) as e:
    print("auto: unknown type")
import condensation
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("auto after import:", type(m).__name__)
m = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1])
print("llama:", type(m).__name__)
"""


def test_saved_model_loads_as_readme_says(tmp_path):
    import torch

    from condensation import CondensationForCausalLM
    from condensation.sizes import build_config

    torch.manual_seed(0)
    CondensationForCausalLM(build_config("debug")).save_pretrained(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "platform") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "auto: unknown type" in out.stdout, out.stdout
    assert "auto after import: CondensationForCausalLM" in out.stdout
    assert "llama: LlamaForCausalLM" in out.stdout
