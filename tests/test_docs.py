"""The docs stay honest: links resolve, every entry point's flags are documented, the README's
quick start keeps the commands CI relies on. Fast: parsers are built, no model is loaded."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# (module, config class, page documenting its flags)
ENTRY_POINTS = [
    ("train_sft", "SFTConfig", "docs/train_sft.md"),
    ("train_rm_llama2", "RMConfig", "docs/train_rm.md"),
    ("train_dpo", "DPOConfig", "docs/train_dpo.md"),
    ("best_of_n", "BestOfNConfig", "docs/best_of_n.md"),
    ("rl.config", "RLConfig", "docs/rl.md"),
    ("demo", "DemoConfig", "docs/demo.md"),
    ("self_ref.generate", "GenerateConfig", "docs/self_ref.md"),
    ("self_ref.label", "LabelConfig", "docs/self_ref.md"),
    ("self_ref.evaluate", "EvaluateConfig", "docs/self_ref.md"),
    ("self_ref.compare_policies", "CompareConfig", "docs/self_ref.md"),
    ("benchmarks.packing", "PackingBenchmarkConfig", "docs/benchmarks.md"),
    ("benchmarks.rm_throughput", "RMThroughputConfig", "docs/benchmarks.md"),
    ("benchmarks.remax_vs_ppo", "RemaxVsPPOConfig", "docs/benchmarks.md"),
    ("benchmarks.label_throughput", "LabelBenchmarkConfig", "docs/benchmarks.md"),
    ("benchmarks.judge_variants", "VariantsConfig", "docs/benchmarks.md"),
    ("benchmarks.bf16_cpu", "Bf16CpuConfig", "docs/benchmarks.md"),
    ("benchmarks.rl_vs_trl", "RLvsTRLConfig", "docs/benchmarks.md"),
    ("benchmarks.lora", "LoraBenchmarkConfig", "docs/benchmarks.md"),
]

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def strip_code(text: str) -> str:
    """The text outside fenced code blocks (links and headings inside them are not links)."""
    out, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append(line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped except '-' and '_', spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # links keep their text
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in strip_code(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def relative_links(path: Path) -> list[str]:
    links = []
    for target in LINK.findall(strip_code(path.read_text(encoding="utf-8"))):
        if re.match(r"^(https?:|mailto:)", target, re.I):
            continue
        links.append(target)
    return links


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path):
    broken = []
    for target in relative_links(md):
        file_part, _, anchor = target.partition("#")
        dest = md if not file_part else (md.parent / file_part).resolve()
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading '#{anchor}' in {dest.relative_to(ROOT)})")
    assert not broken, f"{md.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link these docs pages: {missing}"


def documented_flags(module: str, cls_name: str) -> list[str]:
    from training.config import build_parser

    cls = getattr(importlib.import_module(module), cls_name)
    parser = build_parser(cls)
    flags = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help" and not opt.startswith("--no-"):
                flags.add(opt)
    return sorted(flags)


@pytest.mark.parametrize("module,cls_name,page", ENTRY_POINTS, ids=[f"{m}.{c}" for m, c, _ in ENTRY_POINTS])
def test_every_flag_is_documented(module: str, cls_name: str, page: str):
    text = (ROOT / page).read_text(encoding="utf-8")
    flags = documented_flags(module, cls_name)
    assert "--config" in flags
    missing = [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text)]
    assert not missing, f"{page} does not document these flags of {module}.{cls_name}: {', '.join(missing)}"


def quick_start_section(text: str) -> str:
    m = re.search(r"^## Quick start\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "README.md has no '## Quick start' section"
    return m.group(1)


def test_readme_quick_start_and_size():
    text = README.read_text(encoding="utf-8")
    section = quick_start_section(text)
    commands = [line.split("#")[0].strip() for line in section.splitlines()]
    for command in ("make demo", "make test"):
        assert command in commands, f"README.md's Quick start lacks the command line '{command}'"
    size = README.stat().st_size
    assert size < 25 * 1024, f"README.md is {size} bytes; keep it under 25 KB (move detail to docs/)"
