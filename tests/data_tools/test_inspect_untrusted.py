"""navil-inspect on tampered shards: it refuses what the loader refuses, and writes nowhere else.

A copy of the reference run is tampered with: one image member's tar header becomes a symbolic
link to /etc/passwd, one image member's bytes become a PNG whose header declares 2000 x 2000
pixels (over the run's --max-image-pixels of 1 MP), and one sample's index key becomes
`../../evil` (which would name the rendering `<render-dir>/../../evil.png`). Proves: the command
still succeeds, renders the untouched sample only, prints one `refused` line per bad sample
with the reason (the tar file and member for the link), decodes nothing over the limit and
writes no file outside --render-dir.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tarfile
import zlib

from data_tools import inspector


def _png_declaring(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def _with_images(root: str) -> list[tuple[str, dict, dict]]:
    out = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".index.json"):
            with open(os.path.join(root, name)) as f:
                seg = json.load(f)
            out += [(name, seg, s) for s in seg["samples"] if s["num_images"] == 1]
    return out


def test_inspect_refuses_tampered_samples(reference_run, tmp_path, capsys):
    root = str(tmp_path / "ds")
    shutil.copytree(reference_run, root)
    (idx_a, seg_a, link), (_, seg_b, bomb), (idx_c, seg_c, evil), (_, _, good) = _with_images(root)[
        :4
    ]
    member = link["images"][0]["member"]
    off, size = link["members"][member]
    info = tarfile.TarInfo(f"{link['key']}.{member}")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with open(os.path.join(root, seg_a["tar"]), "r+b") as f:
        f.seek(off - 512)
        f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
    member = bomb["images"][0]["member"]
    off, size = bomb["members"][member]
    data = _png_declaring(2000, 2000)
    with open(os.path.join(root, seg_b["tar"]), "r+b") as f:
        f.seek(off)
        f.write(data + bytes(size - len(data)))
    evil["key"] = "../../evil"
    with open(os.path.join(root, idx_c), "w") as f:
        json.dump(seg_c, f)

    look = tmp_path / "r" / "look"
    keys = [link["key"], bomb["key"], "../../evil", good["key"]]
    assert inspector.main([root, "--keys", *keys, "--render-dir", str(look)]) == 0
    out = capsys.readouterr().out
    assert "rendered 1 sample(s)" in out
    refused = [line for line in out.splitlines() if line.startswith("refused ")]
    assert len(refused) == 3, out
    (line,) = [r for r in refused if link["key"] in r]
    assert seg_a["tar"] in line and "symbolic link" in line
    (line,) = [r for r in refused if bomb["key"] in r]
    assert "2000x2000" in line and "more than the limit 1000000" in line
    (line,) = [r for r in refused if "evil" in r]
    assert "is not [A-Za-z0-9_-]" in line
    assert sorted(os.listdir(look)) == sorted([f"{good['key']}.png", "index.html"])
    assert not os.path.exists(look / ".." / ".." / "evil.png")
    assert os.listdir(tmp_path / "r") == ["look"]
