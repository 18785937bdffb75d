"""GGUF files for the llama.cpp peer, made by llama.cpp's own converter (convert_hf_to_gguf.py
from the llama-cpp-python sdist's vendor/llama.cpp, run with this project's torch/transformers).

The converter identifies a BPE pre-tokenizer by hashing the token ids of a fixed test string and
refuses hashes it does not know, and ours (a byte-level BPE trained for the default model) is
unknown to it. We copy the converter into build/cache/peers/convert/ and map our hash explicitly
to "gpt-2" (ours is tokenizers' ByteLevel pre-tokenizer with its GPT-2 split regex). The timing
feeds token ids straight to llama.cpp, so the mapping only affects llama.cpp's own tokenizer.
q8_0 comes from the converter; q4_0 from llama.cpp's quantizer (llama_model_quantize) applied to
the f32 file, in the peer venv (peers/llama_worker.py)."""
from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CONVERTER_TYPES = ("f32", "f16", "q8_0")
MAPPED_PRE_TOKENIZER = "gpt-2"
MARK = "# mapped by exporter/bench/peers/convert.py"


def pre_tokenizer_hash(base_py: str, model_dir: Path) -> str:
    """The hash get_vocab_base_pre computes for model_dir's tokenizer (same string, same code)."""
    from transformers import AutoTokenizer
    m = re.search(r"^\s*chktxt = (.+)$", base_py, re.M)
    if not m:
        raise RuntimeError("convert_hf_to_gguf: chktxt not found (converter layout changed)")
    chktxt = ast.literal_eval(m.group(1))
    tok = AutoTokenizer.from_pretrained(model_dir)
    return hashlib.sha256(str(tok.encode(chktxt)).encode()).hexdigest()


def prepare_converter(vendor: Path, dest: Path, model_dir: Path) -> tuple[Path, str]:
    """Copy the converter (script, conversion/, gguf-py/) to dest and patch our hash in.
    Returns (the script, the hash mapped)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy(vendor / "convert_hf_to_gguf.py", dest)
    shutil.copytree(vendor / "conversion", dest / "conversion")
    shutil.copytree(vendor / "gguf-py", dest / "gguf-py")
    base = dest / "conversion" / "base.py"
    text = base.read_text()
    chkhsh = pre_tokenizer_hash(text, model_dir)
    anchor = "        res = None\n"
    if text.count(anchor) < 1:
        raise RuntimeError("convert_hf_to_gguf: get_vocab_base_pre's `res = None` not found")
    patch = (f"{anchor}        if chkhsh == {chkhsh!r}:  {MARK}\n"
             f"            res = {MAPPED_PRE_TOKENIZER!r}\n")
    i = text.index("def get_vocab_base_pre")
    j = text.index(anchor, i)
    base.write_text(text[:j] + patch + text[j + len(anchor):])
    return dest / "convert_hf_to_gguf.py", chkhsh


def convert(script: Path, model_dir: Path, out: Path, outtype: str, log=print) -> Path:
    """Run the converter once per outtype (skipped when the file exists)."""
    script, model_dir, out = script.resolve(), model_dir.resolve(), out.resolve()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    # gguf-py from the same sdist; sentencepiece, the converter's own requirement, from the peer
    # build's --target directory (build_peers.sh), never installed into the project's venv
    deps = [script.parent / "gguf-py", script.parent.parent / "convert-deps"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(d) for d in deps))
    log(f"converting {model_dir.name} to {out.name} with llama.cpp's converter ({outtype})")
    proc = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(tmp),
                           "--outtype", outtype], capture_output=True, text=True, env=env,
                          cwd=script.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf {outtype} failed: {proc.stderr[-3000:]}")
    tmp.rename(out)
    return out
