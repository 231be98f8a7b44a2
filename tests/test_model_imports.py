"""Dependencies run one way: the model is torch-side code and imports nothing of the data, the
tokenizer or the commands (checked in a fresh interpreter, where nothing else was imported first)."""

from __future__ import annotations

import subprocess
import sys

# everything `import smallcoder.model` may load of the package: the model, its config and loss
MODEL_SIDE = {"smallcoder", "smallcoder.model", "smallcoder.config", "smallcoder.loss", "smallcoder.labels",
              "smallcoder.errors", "smallcoder.checks",  # checks: standard library only
              "smallcoder.quant"}  # torch only: the int8 KV cache's quantizer


def _modules_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_importing_the_model_loads_only_torch_side_modules():
    loaded = _modules_after("import smallcoder.model")
    assert "smallcoder.model" in loaded and "torch" in loaded
    bad = sorted(m for m in loaded if m.startswith(("smallcoder.data", "smallcoder.tokenizer", "tokenizers"))
                 or m.split(".")[0] == "tokenizers")
    assert not bad, f"import smallcoder.model loaded {bad}"
    assert {m for m in loaded if m.split(".")[0] == "smallcoder"} <= MODEL_SIDE

