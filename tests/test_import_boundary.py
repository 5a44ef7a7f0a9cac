"""The pure-Python core must import without torch (style.md section 6.1)."""

import subprocess
import sys

PURE_MODULES = ["csps.config", "csps.request", "csps.contract", "csps.contract.sp_attention",
                "csps.scheduler", "csps.scheduler.deployment", "csps.kvcache.block_pool",
                "csps.kvcache.kv_cache_manager", "csps.kvcache.placement", "csps.engine.outputs",
                "csps.engine.output_processor", "csps.inputs"]


def test_scheduler_core_imports_without_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PURE_MODULES)
            + "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
            + "print(bad); sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_parallel_imports_torch_distributed():
    """Process groups live in csps/parallel/; everything else is handed them explicitly."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "csps"
    pattern = re.compile(r"^\s*(import torch\.distributed|from torch\.distributed|"
                         r"from torch import distributed)", re.M)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "parallel" not in p.parts and pattern.search(p.read_text())]
    assert offenders == []


def test_contract_depends_on_nothing_and_policies_not_on_scheduler():
    """contract/ is below every package (beside request.py's plain values); policies see the
    books' interface (books.py), not
    Scheduler, and import nothing inside functions (no hidden import circle)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "csps"
    for path in (root / "contract").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("csps."):
                # csps.request: SamplingParams, a request's own plain values (no imports)
                assert node.module.startswith(("csps.contract", "csps.request")), \
                    (path.name, node.module)
    policies = ["policy.py", "sps2.py", "loongserve.py", "loongserve_admission.py",
                "loongserve_batching.py", "configurator.py", "instances.py", "policies.py"]
    for name in policies:
        tree = ast.parse((root / "scheduler" / name).read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert "csps.scheduler.scheduler" not in imported, name
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            assert not any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(fn)), \
                f"{name}:{fn.name} imports inside a function"
