"""Exports the released NaViL code can load, and `navil-convert check-release`.

Proves, without the released code (its constraints are restated in conversion/release.py):
- windows: the released encoder always permutes merged tokens into window order (window side
  window_size // merge, padded windows dropped). `released_window_order` below recomputes that
  permutation from its definition. For a model trained in row order the exported window_size
  makes it the identity for the widest and the tallest admissible image (found by searching the
  processor's resize over aspect ratios up to 200:1 and sizes around the pixel budget), for
  every scale of a multi-scale image, and the bound is tight (the widest image reaches it); the
  released default window of 8 patches does NOT give the identity for an image wider than 4
  merged tokens. A model trained in window order (`keep_window_order`) keeps its own window and
  round-trips it through config.json.
- config.json has the released auto_map pointing at the family's hub code (NaViL-2B for
  InternLM2, NaViL-9B for Qwen3), or at local copies with --modeling-code (copied in); the export
  writes generation_config.json.
- check-release passes on a released-style NaViL-2B and NaViL-9B config (shapes of
  ../shared/navil-reference.md, no megatron_navil section) and on a full export that carries its
  tokenizer; each violation gets one line naming the field: a missing required field, a wrong
  llm architecture, an unregistered template, vision qk_normalization with several heads,
  window_size < merge, a row-order model with a narrow window, window attention trained in row
  order, experts switched off, an auto_map at the wrong repository, local code that is absent,
  missing generation_config.json, no tokenizer, a special token at the wrong id, a missing
  weight. The CLI exits 1 on problems and 0 otherwise.
Exact comparisons throughout (integer logic and file contents).
"""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_navil.backbones import get_backbone
from megatron_navil.config import get_flavor
from megatron_navil.conversion.hf_config import EXTENSION, from_hf_config, to_hf_config
from megatron_navil.conversion.release import check_config, check_release
from megatron_navil.conversion.released import raster_window_patches, widest_merged_tokens
from megatron_navil.data.layout import multiscale_plan, resize_for_scale
from tests.checkpoint_tools.plain_llm import make_llm_dir


def released_window_order(h_m: int, w_m: int, window_patches: int, merge: int = 2) -> list[int]:
    """Merged-token order of one h_m x w_m grid under the released get_window_index: the window
    side is window_patches // merge (asserted > 0); each dim is padded by side - dim % side (a
    whole empty window when it divides), windows are taken row by row, tokens row by row inside a
    window, padding dropped."""
    side = window_patches // merge
    assert side > 0, "the released encoder asserts this"
    ph, pw = h_m + side - h_m % side, w_m + side - w_m % side
    grid = [[r * w_m + c if r < h_m and c < w_m else -1 for c in range(pw)] for r in range(ph)]
    order = []
    for wr in range(ph // side):
        for wc in range(pw // side):
            for r in range(wr * side, (wr + 1) * side):
                order += [i for i in grid[r][wc * side : (wc + 1) * side] if i >= 0]
    return order


def _is_identity(h_m: int, w_m: int, window_patches: int) -> bool:
    return released_window_order(h_m, w_m, window_patches) == list(range(h_m * w_m))


def _extreme_grids(cfg) -> tuple[tuple[int, int], tuple[int, int]]:
    """Patch grids of the widest and the tallest admissible image: a search over images of
    aspect ratio 200:1 (the processor's limit) on both sides of the pixel budget."""
    p, m = cfg.vision.patch_size, cfg.connector.merge_size
    lo, hi = cfg.min_dynamic_patch * p * p, cfg.max_dynamic_patch * p * p
    best = (0, 0)
    for h in list(range(1, 400)) + list(range(1000, 1200)):
        for w in (200 * h, 200 * h - 1):
            g = resize_for_scale(h, w, lo, hi, p, m).grid
            best = max(best, g, key=lambda x: x[1])
    return best, best[::-1]


@pytest.mark.parametrize("flavor", ["navil-2b", "debug-internlm2"])
def test_raster_order_export_window_is_identity_for_every_admissible_image(flavor):
    cfg = get_flavor(flavor)
    assert cfg.vision.window_size == 0 and not cfg.vision.keep_window_order
    hf = to_hf_config(cfg, "bfloat16")
    window = hf["vision_config"]["window_size"]
    assert (
        window == raster_window_patches(cfg)
        and hf["vision_config"]["fullatt_block_indexes"] is None
    )
    m = cfg.connector.merge_size
    widest, tallest = _extreme_grids(cfg)
    assert widest[1] // m == widest_merged_tokens(cfg), "the bound must be reached (tight)"
    for gh, gw in (widest, tallest):
        assert _is_identity(gh // m, gw // m, window), (gh, gw)
    # the released default window reorders an image wider than 4 merged tokens
    assert not _is_identity(3, 6, 8) and _is_identity(3, 4, 8)
    # every scale of a multi-scale image of each extreme (and a square one) too
    p = cfg.vision.patch_size
    for h, w in ((178, 35600), (35600, 178), (5000, 5000)):
        for scale in multiscale_plan(h, w, cfg):
            gh, gw = scale.grid
            assert gw // m <= window // m and _is_identity(gh // m, gw // m, window)
    # reading our own export back gives the model we had (no window, row order)
    back = from_hf_config(hf)
    assert back.vision.window_size == 0 and not back.vision.keep_window_order
    assert back.to_dict() == cfg.to_dict()
    if flavor == "navil-2b":
        assert widest_merged_tokens(cfg) == 1109 and window == 2218 and p == 16


def test_window_order_model_keeps_its_window():
    cfg = get_flavor("debug-qwen3").apply_overrides(
        {
            "vision.window_size": 128,
            "vision.keep_window_order": True,
            "vision.fullatt_block_indexes": [1],
        }
    )
    hf = to_hf_config(cfg, "float32")
    assert hf["vision_config"]["window_size"] == 128 // cfg.vision.patch_size
    assert hf["vision_config"]["fullatt_block_indexes"] == [1]
    assert from_hf_config(hf).to_dict() == cfg.to_dict()
    assert check_config(hf) == []


@pytest.mark.parametrize(
    "flavor, repo", [("navil-2b", "OpenGVLab/NaViL-2B"), ("navil-9b", "OpenGVLab/NaViL-9B")]
)
def test_released_style_configs_pass(flavor, repo):
    """As the release writes them: its window (8 patches), every layer full, no section of ours."""
    d = to_hf_config(get_flavor(flavor), "bfloat16")
    del d[EXTENSION]
    d["vision_config"].update(window_size=8, fullatt_block_indexes=None)
    assert get_backbone(get_flavor(flavor).llm.backbone).released_repo == repo
    assert d["auto_map"] == {
        "AutoConfig": f"{repo}--configuration_navil_chat.NaViLChatConfig",
        "AutoModel": f"{repo}--modeling_navil_chat.NaViL",
        "AutoModelForCausalLM": f"{repo}--modeling_navil_chat.NaViL",
    }
    assert check_config(d) == []


def _released_2b():
    return to_hf_config(get_flavor("navil-2b"), "bfloat16")


VIOLATIONS = {
    "missing_field": (lambda d: d.pop("template"), "template: missing"),
    "missing_vision_field": (
        lambda d: d["vision_config"].pop("qk_normalization"),
        "vision_config.qk_normalization: missing",
    ),
    "llm_architecture": (
        lambda d: d["llm_config"].update(architectures=["LlamaForCausalLM"]),
        "llm_config.architectures: 'LlamaForCausalLM'",
    ),
    "template": (lambda d: d.update(template="chatml"), "template: 'chatml' is not a released"),
    "qk_norm_heads": (
        lambda d: d["vision_config"].update(qk_normalization=True),
        "vision_config.qk_normalization: true with 12 heads",
    ),
    "window_zero": (
        lambda d: d["vision_config"].update(window_size=0),
        "vision_config.window_size: 0 patches; the released encoder asserts",
    ),
    "narrow_window": (
        lambda d: d["vision_config"].update(window_size=8),
        "the released window order is the identity only from 2218 patches: set it to 2218",
    ),
    "row_order_windows": (
        lambda d: d[EXTENSION].update(window_size=512),
        "keep_window_order: false with window attention",
    ),
    "no_experts": (lambda d: d[EXTENSION].update(ffn_experts=False), "always has modality experts"),
    "wrong_repo": (
        lambda d: d["auto_map"].update(AutoModel="OpenGVLab/NaViL-9B--modeling_navil_chat.NaViL"),
        "auto_map.AutoModel: OpenGVLab/NaViL-9B does not hold the internlm2 code",
    ),
    "wrong_class": (
        lambda d: d["auto_map"].update(AutoConfig="configuration_navil.Foo"),
        "auto_map.AutoConfig: 'configuration_navil.Foo' does not name",
    ),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_each_config_violation_is_one_line_naming_the_field(name):
    d = _released_2b()
    assert check_config(d) == []
    mutate, expected = VIOLATIONS[name]
    mutate(d)
    problems = check_config(d)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.fixture
def exported(tmp_path, cli):
    """A debug model converted from a plain InternLM2 LLM (its tokenizer travels), exported."""
    make_llm_dir(tmp_path / "llm", "internlm2")
    assert (
        cli(
            [
                "llm-to-navil",
                "--hf-llm",
                tmp_path / "llm",
                "--flavor",
                "debug-internlm2",
                "--output",
                tmp_path / "ck",
                "--no-progress",
            ]
        )[0]
        == 0
    )
    rc, out, _ = cli(
        ["navil-to-hf", "--load", tmp_path / "ck", "--output", tmp_path / "hf", "--no-progress"]
    )
    assert rc == 0 and "release check OK" in out, out
    return tmp_path / "hf"


def test_export_passes_and_each_file_problem_is_named(exported, cli, tmp_path):
    assert check_release(exported) == []
    assert json.loads((exported / "generation_config.json").read_text())["_from_model_config"]
    rc, out, _ = cli(["check-release", exported])
    assert rc == 0 and "release check OK" in out

    def broken(name, change, expected):
        d = tmp_path / name
        shutil.copytree(exported, d)
        change(d)
        problems = check_release(d)
        assert any(expected in p for p in problems), (name, problems)
        rc, out, _ = cli(["check-release", d])
        assert rc == 1 and expected in out
        return problems

    broken(
        "nogen",
        lambda d: (d / "generation_config.json").unlink(),
        "generation_config.json: missing",
    )
    broken(
        "notok",
        lambda d: [(d / n).unlink() for n in ("tokenizer.model",) if (d / n).exists()],
        "tokenizer: no tokenizer files",
    )

    def move_token(d):
        added = json.loads((d / "added_tokens.json").read_text())
        added["<img>"] = 3
        (d / "added_tokens.json").write_text(json.dumps(added))

    broken("badid", move_token, "gives <img> id 3, the model's embedding row is 228")

    def drop_weight(d):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        index["weight_map"].pop("mlp1.1.weight")
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    problems = broken("noweight", drop_weight, "weights:")
    assert any("mlp1.1.weight" in p for p in problems), problems

    def local_code(d):
        c = json.loads((d / "config.json").read_text())
        c["auto_map"] = {k: v.split("--")[1] for k, v in c["auto_map"].items()}
        (d / "config.json").write_text(json.dumps(c))

    broken("localcode", local_code, "names local modeling_navil_chat.py, which is not in")


def test_modeling_code_is_copied_and_auto_map_made_local(tmp_path, cli):
    make_llm_dir(tmp_path / "llm", "internlm2")
    assert (
        cli(
            [
                "llm-to-navil",
                "--hf-llm",
                tmp_path / "llm",
                "--flavor",
                "debug-internlm2",
                "--output",
                tmp_path / "ck",
                "--no-progress",
            ]
        )[0]
        == 0
    )
    code = tmp_path / "code"
    code.mkdir()
    rc, _, err = cli(
        [
            "navil-to-hf",
            "--load",
            tmp_path / "ck",
            "--output",
            tmp_path / "x",
            "--modeling-code",
            code,
            "--no-progress",
        ]
    )
    assert rc == 2 and "lacks configuration_navil_chat.py, modeling_navil_chat.py" in err
    assert not (tmp_path / "x").exists()
    for name in ("configuration_navil_chat.py", "modeling_navil_chat.py", "conversation.py"):
        (code / name).write_text(f"# stand-in for the released {name}\n")
    rc, out, _ = cli(
        [
            "navil-to-hf",
            "--load",
            tmp_path / "ck",
            "--output",
            tmp_path / "hf",
            "--modeling-code",
            code,
            "--no-progress",
        ]
    )
    assert rc == 0 and "release check OK" in out, out
    c = json.loads((tmp_path / "hf/config.json").read_text())
    assert c["auto_map"]["AutoModel"] == "modeling_navil_chat.NaViL"
    for name in ("configuration_navil_chat.py", "modeling_navil_chat.py", "conversation.py"):
        assert (tmp_path / "hf" / name).read_bytes() == (code / name).read_bytes()


def test_verify_compares_the_checkpoints_own_tokenizer(exported, cli, tmp_path):
    rc, out, _ = cli(["verify", "--load", tmp_path / "ck", "--hf", exported])
    assert rc == 0 and "tokenizer: same" in out, out
    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    data = (tampered / "tokenizer.model").read_bytes()
    (tampered / "tokenizer.model").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    rc, out, _ = cli(["verify", "--load", tmp_path / "ck", "--hf", tampered])
    assert rc == 1 and "tokenizer: differs: tokenizer.model" in out, out
