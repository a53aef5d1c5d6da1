"""Every shipped config parses against its dataclass, and every config field is read somewhere.

A flag that nothing reads lies to its user (``--apply_chat_template false`` was once silently
ignored), so each field of each entry point's config must be read by the code that entry point
runs: its own file and every repository module it imports, statically (imports inside functions
included). Lines that define a field, and the bodies of ``__post_init__`` / ``check_*`` (which only
validate), do not count as reads.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from training.config import load_yaml

ROOT = Path(__file__).resolve().parents[1]


def _config_classes():
    import best_of_n
    import demo
    import train_dpo
    import train_rm_llama2
    import train_sft
    from benchmarks.bf16_cpu import Bf16CpuConfig
    from benchmarks.label_throughput import LabelBenchmarkConfig
    from benchmarks.lora import LoraBenchmarkConfig
    from benchmarks.packing import PackingBenchmarkConfig
    from benchmarks.remax_vs_ppo import RemaxVsPPOConfig
    from benchmarks.rl_vs_trl import RLvsTRLConfig
    from benchmarks.rm_throughput import RMThroughputConfig
    from rl.config import RLConfig
    from self_ref import compare_policies
    from self_ref.evaluate import EvaluateConfig
    from self_ref.generate import GenerateConfig
    from self_ref.label import LabelConfig

    return {
        # config class: (entry module file, the YAML prefixes it reads)
        train_sft.SFTConfig: ("train_sft.py", ("sft_",)),
        train_rm_llama2.RMConfig: ("train_rm_llama2.py", ("rm_",)),
        train_dpo.DPOConfig: ("train_dpo.py", ("dpo_",)),
        best_of_n.BestOfNConfig: ("best_of_n.py", ("best_of_n_",)),
        RLConfig: ("fsdp_ppo_ray.py", ("ppo_", "remax_")),
        GenerateConfig: ("self_ref/generate.py", ("generate_",)),
        LabelConfig: ("self_ref/label.py", ("judge_small.yaml",)),
        EvaluateConfig: ("self_ref/evaluate.py", ("judge_small.yaml",)),
        compare_policies.CompareConfig: ("self_ref/compare_policies.py", ()),
        demo.DemoConfig: ("demo.py", ()),
        Bf16CpuConfig: ("benchmarks/bf16_cpu.py", ("benchmark_bf16_cpu",)),
        LabelBenchmarkConfig: ("benchmarks/label_throughput.py", ("benchmark_label_throughput",)),
        LoraBenchmarkConfig: ("benchmarks/lora.py", ()),
        PackingBenchmarkConfig: ("benchmarks/packing.py", ("benchmark_packing",)),
        RemaxVsPPOConfig: ("benchmarks/remax_vs_ppo.py", ("benchmark_remax_vs_ppo",)),
        RMThroughputConfig: ("benchmarks/rm_throughput.py", ("benchmark_rm_throughput",)),
        RLvsTRLConfig: ("benchmarks/rl_vs_trl.py", ("benchmark_rl_vs_trl",)),
    }


PROMPT_TEMPLATES = ("self_ref_prompts.yaml", "judge_small_prompts.yaml")  # JudgePrompts, not flags
YAMLS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", YAMLS)
def test_every_shipped_config_parses_against_its_dataclass(name):
    path = ROOT / "configs" / name
    if name in PROMPT_TEMPLATES:
        from self_ref.prompts import JudgePrompts

        JudgePrompts.load(str(path))
        return
    readers = [cls for cls, (_, prefixes) in _config_classes().items() if name.startswith(prefixes)]
    assert readers, f"configs/{name}: no config class claims it (add it to _config_classes)"
    for cls in readers:
        values = load_yaml(cls, path)  # unknown keys and wrong types fail here, naming the key
        required = {"pretrain": "p", "dataset": "d", "reward_pretrain": "r", "prompt_data": "d",
                    "input": "i", "output": "o", "model": "m"}
        fields = {f.name for f in dataclasses.fields(cls)}
        filled = {k: v for k, v in required.items() if k in fields and not values.get(k)}
        if cls.__name__ == "DemoConfig":
            filled = {}
        cls(**(filled | values))  # the value rules of __post_init__


def _repo_module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.exists():
            return candidate
    return None


def _imported_files(entry: Path) -> set[Path]:
    """``entry`` and every repository module it imports, transitively (any import statement)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                f = _repo_module_file(n)
                if f is not None and "tests" not in f.relative_to(ROOT).parts:
                    todo.append(f)
    return seen


def _reading_source(path: Path) -> str:
    """The file's text without the bodies of validators (``__post_init__``, ``check_*``)."""
    lines = path.read_text().splitlines()
    drop: set[int] = set()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                node.name == "__post_init__" or node.name.startswith("check")):
            drop.update(range(node.body[0].lineno - 1, node.end_lineno))
    return "\n".join(line for i, line in enumerate(lines) if i not in drop)


# Read through a computed name (getattr(self, f"policy_{side}")): the pattern that reads them.
READ_BY_PATTERN = {f"{kind}_{side}": rf"f\"{kind}_\{{" for kind in ("policy", "responses") for side in "ab"}


@pytest.mark.parametrize("cls_name", [cls.__name__ for cls in _config_classes()])
def test_every_config_field_is_read_by_its_entry_point(cls_name):
    cls, entry = next((c, e) for c, (e, _) in _config_classes().items() if c.__name__ == cls_name)
    texts = [_reading_source(f) for f in sorted(_imported_files(ROOT / entry))]
    unread = []
    for f in dataclasses.fields(cls):
        # an attribute read (not a method of the same name: tokenizer.apply_chat_template(...)) or a key
        pattern = READ_BY_PATTERN.get(f.name, rf"\.{f.name}\b(?!\s*\()|[\"']{f.name}[\"']")
        reads = (line for t in texts for line in t.splitlines() if not re.match(rf"^\s+{f.name}\s*:", line))
        if not any(re.search(pattern, line) for line in reads):
            unread.append(f.name)
    assert not unread, f"{cls_name}: fields no code of {entry} reads (remove them or use them): {unread}"
