"""The package's layering, read from its import graph (tools/layering.py; lazy imports inside
functions count): no import loop, quantization never imports adapter methods, teaching or
experiment code, library modules never import experiments, no module imports another
module's private names, no module over 600 lines."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("layering", ROOT / "tools" / "layering.py")
layering = importlib.util.module_from_spec(spec)
sys.modules["layering"] = layering
spec.loader.exec_module(layering)


def test_the_package_keeps_its_layering():
    graph = layering.build()
    broken = layering.violations(graph)
    assert not broken, "layering rules broken:\n" + "\n".join(broken)


def test_the_rules_catch_what_they_forbid(tmp_path):
    """A small package that breaks every rule once: each break is reported."""
    pkg = tmp_path / "lora_course"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "experiments").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "quant" / "__init__.py").write_text("")
    (pkg / "experiments" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from .a import other  # lazy, still an arrow\n")
    (pkg / "quant" / "q.py").write_text("from ..a import thing\n")
    (pkg / "lib.py").write_text("from .experiments import run\nfrom .a import _private\n" + "x = 1\n" * 601)
    broken = layering.violations(layering.build(tmp_path))
    text = "\n".join(broken)
    assert "import loop: lora_course.a <-> lora_course.b" in text
    assert "quantization imports lora_course.a" in text
    assert "library module imports experiments: lora_course.lib" in text
    assert "private import: lora_course.lib imports lora_course.a._private" in text
    assert "module over 600 lines: lora_course.lib" in text
