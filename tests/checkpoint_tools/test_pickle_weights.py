"""`pytorch_model*.bin` (pickle) weights: refused unless --trust-pickle, and even then restricted.

Proves, for hf-to-navil (an HF NaViL directory) and llm-to-navil (a plain HF LLM) whose weights
are re-saved here with torch.save as `pytorch_model.bin`:
- without --trust-pickle: exit 2, one line naming the .bin file, saying safetensors are
  preferred and how to allow it, nothing written;
- with --trust-pickle: the checkpoint's tensor files are byte-identical to the ones converted
  from the safetensors originals (also for a sharded .bin with its index);
- a .bin that also holds a pickled call (os.mkdir of a marker directory) is refused with one
  line even with --trust-pickle, and the call never runs (torch.load(weights_only=True));
- verify and check-release name a .bin-only directory instead of "no safetensors";
- an index (safetensors or .bin) listing a file outside its directory is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.hf_weights import PickleDir
from megatron_navil.conversion.safetensors_io import SafetensorsDir
from tests.checkpoint_tools.conftest import load_hf_tensors
from tests.checkpoint_tools.plain_llm import make_llm_dir


def _to_bin(src: Path, dst: Path, shards: int = 1) -> dict[str, torch.Tensor]:
    """Copy an HF directory with its safetensors replaced by torch.save pickles."""
    shutil.copytree(src, dst)
    tensors = load_hf_tensors(dst)
    for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.safetensors.index.json")):
        f.unlink()
    if shards == 1:
        torch.save(tensors, dst / "pytorch_model.bin")
        return tensors
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        chunk = {n: tensors[n] for n in names[i::shards]}
        torch.save(chunk, dst / part)
        weight_map.update({n: part for n in chunk})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def _one_error_line(rc: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _tensor_files(ck: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ck / "iter_0000000").glob("*.distcp"))}


class _Mkdir:
    """Pickles as a call to os.mkdir(path): what a hostile .bin could run on load."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_hf_to_navil_bin_only_with_trust_pickle(cli, navil, tmp_path):
    hf = tmp_path / "hf"
    _to_bin(navil / "hf", hf)
    out = tmp_path / "ck"
    line = _one_error_line(*cli(["hf-to-navil", "--hf", hf, "--output", out])[::2])
    assert str(hf / "pytorch_model.bin") in line
    assert "pickle" in line and "safetensors are preferred" in line and "--trust-pickle" in line
    assert not out.exists()
    rc, _, err = cli(
        ["hf-to-navil", "--hf", hf, "--output", out, "--trust-pickle", "--no-progress"]
    )
    assert rc == 0, err
    assert _tensor_files(out) == _tensor_files(navil / "ck")


def test_sharded_bin_with_index(navil, tmp_path):
    hf = tmp_path / "hf"
    tensors = _to_bin(navil / "hf", hf, shards=3)
    src = PickleDir(hf)
    assert sorted(src.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert src.info(name) == (tuple(t.shape), t.dtype)
        assert torch.equal(src.load(name), t)


def test_hostile_bin_is_refused_even_when_trusted(cli, navil, tmp_path):
    hf = tmp_path / "hf"
    tensors = _to_bin(navil / "hf", hf)
    marker = tmp_path / "pwned"
    torch.save({**tensors, "extra": _Mkdir(marker)}, hf / "pytorch_model.bin")
    out = tmp_path / "ck"
    rc, _, err = cli(["hf-to-navil", "--hf", hf, "--output", out, "--trust-pickle"])
    line = _one_error_line(rc, err)
    assert "pytorch_model.bin" in line and "weights_only=True" in line
    assert not marker.exists() and not out.exists()


def test_llm_to_navil_bin_only_with_trust_pickle(cli, tmp_path):
    make_llm_dir(tmp_path / "llm", "qwen3")
    _to_bin(tmp_path / "llm", tmp_path / "llm_bin")
    base = ["llm-to-navil", "--flavor", "debug-qwen3", "--no-progress"]
    rc, _, err = cli([*base, "--hf-llm", tmp_path / "llm", "--output", tmp_path / "a"])
    assert rc == 0, err
    line = _one_error_line(
        *cli([*base, "--hf-llm", tmp_path / "llm_bin", "--output", tmp_path / "b"])[::2]
    )
    assert str(tmp_path / "llm_bin" / "pytorch_model.bin") in line and "--trust-pickle" in line
    assert not (tmp_path / "b").exists()
    rc, _, err = cli(
        [*base, "--hf-llm", tmp_path / "llm_bin", "--output", tmp_path / "b", "--trust-pickle"]
    )
    assert rc == 0, err
    assert _tensor_files(tmp_path / "b") == _tensor_files(tmp_path / "a")


def test_verify_and_check_release_name_the_bin(cli, navil, tmp_path):
    hf = tmp_path / "hf"
    _to_bin(navil / "hf", hf)
    line = _one_error_line(*cli(["verify", "--load", navil / "ck", "--hf", hf])[::2])
    assert "pytorch_model.bin" in line and "safetensors" in line and "--trust-pickle" not in line
    rc, out, _ = cli(["check-release", hf])
    assert rc == 1 and "weights:" in out and "pytorch_model.bin is a pickle" in out


def test_index_naming_a_file_outside_the_directory(navil, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(navil / "hf", hf)
    shard = next(hf.glob("*.safetensors")).name
    tensors = load_hf_tensors(hf)
    for bad in ("../" + shard, str(hf / shard)):
        weight_map = {n: bad for n in tensors}
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        try:
            SafetensorsDir(hf)
        except ConversionError as e:
            assert "not a file name inside its directory" in str(e) and bad in str(e)
        else:
            raise AssertionError(f"{bad} was accepted")
    (hf / "model.safetensors.index.json").unlink()
    _to_bin(navil / "hf", tmp_path / "hf_bin", shards=2)
    (tmp_path / "hf_bin" / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"x": "/etc/passwd"}})
    )
    try:
        PickleDir(tmp_path / "hf_bin")
    except ConversionError as e:
        assert "not a file name inside its directory" in str(e)
    else:
        raise AssertionError("an absolute .bin name was accepted")
