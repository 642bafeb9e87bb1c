"""Loading RL and SFT records, bad-record reporting, and Qwen2-VL's image sizing."""
import json
import logging
import math
from pathlib import Path

import pytest
from PIL import Image

from r1vl.data.records import BadRecordError, Example, load_examples, load_image, load_sft, read_records, smart_resize

SOLUTION = "### Step 1:\n12/2=6\n### The final answer is:\n6"


def _png(path: Path, size=(30, 20), colour=(10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _record(i: int, **over) -> dict:
    r = {"image_path": f"img/{i}.png", "problem": f"q{i}", "solution": SOLUTION,
         "key_steps": {"Steps": ["12/2=6", ["x = 3", "x=3"]]}}
    r.update(over)
    return {k: v for k, v in r.items() if v is not None}


def _jsonl(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def root(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png")
    return tmp_path


# --------------------------------------------------------------------------- RL records

def test_jsonl_and_json_list_give_the_same_examples(root):
    records = [_record(0), _record(1, key_steps=None)]
    a = load_examples(_jsonl(root / "d.jsonl", records))
    (root / "d.json").write_text(json.dumps(records, indent=1))
    b = load_examples(root / "d.json")
    assert [(e.image_path, e.problem, e.solution, e.key_steps) for e in a.items] == \
           [(e.image_path, e.problem, e.solution, e.key_steps) for e in b.items]
    first, second = a.items
    assert first == Example(root / "img/0.png", "q0", SOLUTION, (("12/2=6",), ("x = 3", "x=3")),
                            source=f"{root / 'd.jsonl'}:0")
    assert second.key_steps == ()  # optional
    assert a.bad == [] and "loaded 2 records, skipped 0" in a.summary()


def test_image_root_and_blank_lines(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("data")
    path = _jsonl(other / "d.jsonl", ["", json.dumps(_record(2)), "   "])
    loaded = load_examples(path, image_root=root)
    assert [e.image_path for e in loaded.items] == [root / "img/2.png"]
    assert load_image(loaded.items[0].image_path).size == (30, 20)


@pytest.mark.parametrize("record, reason", [
    (_record(1, problem=None), "missing field 'problem'"),
    (_record(1, solution=7), "field 'solution' must be str, got int"),
    (_record(1, image_path="img/none.png"), "image not found"),
    (_record(1, image_path="img/corrupt.png"), "corrupt image"),
    (_record(1, image_path="img/truncated.png"), "corrupt image"),
    (_record(1, key_steps={"Steps": [3]}), "key_steps.Steps[0]"),
    (_record(1, key_steps={"Steps": [["a", ""]]}), "key_steps.Steps[0]"),
    (_record(1, key_steps="Key Elements: ..."), 'field "key_steps" must be'),
    ("{not json", "line 2 unreadable"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_record_names_file_index_and_reason(root, record, reason):
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    Image.effect_noise((64, 64), 50).save(root / "img" / "full.png")
    full = (root / "img" / "full.png").read_bytes()
    (root / "img" / "truncated.png").write_bytes(full[: len(full) // 2])
    path = _jsonl(root / "d.jsonl", [_record(0), record, _record(2)])
    with pytest.raises(BadRecordError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}: record 1: ") and reason in message
    assert info.value.bad.index == 1 and isinstance(info.value, ValueError)


def test_skip_bad_records_counts_and_reports(root, caplog):
    path = _jsonl(root / "d.jsonl", [_record(0), "{broken", _record(1, problem=None),
                                     _record(3), _record(1, image_path="img/missing.png")])
    with caplog.at_level(logging.WARNING, logger="r1vl.data.records"):
        loaded = load_examples(path, skip_bad_records=True)
    assert [e.problem for e in loaded.items] == ["q0", "q3"]
    assert [b.index for b in loaded.bad] == [1, 2, 4]
    summary = loaded.summary()
    assert "loaded 2 records, skipped 3" in summary and "record 4: image not found" in summary
    assert "skipped 3" in caplog.text


def test_invalid_utf8_line_is_one_bad_record(root):
    path = root / "d.jsonl"
    path.write_bytes(json.dumps(_record(0)).encode() + b"\n{\"problem\": \"\xff\xfe\"}\n"
                     + json.dumps(_record(2)).encode() + b"\n")
    loaded = load_examples(path, skip_bad_records=True)
    assert [e.problem for e in loaded.items] == ["q0", "q2"]
    assert loaded.bad[0].index == 1 and "line 2 unreadable" in loaded.bad[0].reason


def test_check_images_off_defers_image_errors(root):
    path = _jsonl(root / "d.jsonl", [_record(0, image_path="img/missing.png")])
    example = load_examples(path, check_images=False).items[0]
    with pytest.raises(ValueError, match="cannot read image .*missing.png"):
        load_image(example.image_path)


def test_broken_json_list_is_an_error_naming_the_file(root):
    (root / "d.json").write_text('[{"image_path": "img/0.png",')
    with pytest.raises(ValueError, match="d.json: not valid JSON"):
        list(read_records(root / "d.json"))


# --------------------------------------------------------------------------- SFT records

def test_sft_placeholder_form(root):
    rec = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "<image>Compare <image> and the first."},
                        {"role": "assistant", "content": "### Step 1: ..."}],
           "images": ["img/0.png", "img/1.png"]}
    ex = load_sft(_jsonl(root / "s.jsonl", [rec])).items[0]
    assert ex.image_paths == (root / "img/0.png", root / "img/1.png")
    assert ex.messages[1] == {"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Compare "}, {"type": "image"},
        {"type": "text", "text": " and the first."}]}
    assert ex.messages[2]["content"] == [{"type": "text", "text": "### Step 1: ..."}]


def test_sft_content_list_form(root):
    rec = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "img/3.png"},
                                     {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "2"}]}]}
    ex = load_sft(_jsonl(root / "s.jsonl", [rec])).items[0]
    assert ex.image_paths == (root / "img/3.png",)
    assert ex.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "How many?"}]


@pytest.mark.parametrize("rec, reason", [
    ({"messages": [{"role": "user", "content": "<image>q"}], "images": ["img/0.png"]},
     "no assistant message"),
    ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
      "images": []}, "1 image placeholders but 0 image paths"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "messages[0] must be an object with role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0.png"}]},
                   {"role": "assistant", "content": "a"}], "images": ["img/0.png"]},
     "both"),
    ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
      "images": ["img/nope.png"]}, "image not found"),
    ({"messages": "hello"}, "field 'messages' must be list"),
])
def test_sft_bad_records(root, rec, reason):
    path = _jsonl(root / "s.jsonl", [rec])
    with pytest.raises(BadRecordError, match=f"s.jsonl: record 0: .*{reason}".replace("[", r"\[").replace("]", r"\]")):
        load_sft(path)
    assert load_sft(path, skip_bad_records=True).bad[0].index == 0


# --------------------------------------------------------------------------- images

SIZES = [(20, 30), (28, 28), (56, 56), (100, 50), (333, 777), (1080, 1920), (4000, 3000),
         (13, 2000), (3000, 20)]


@pytest.mark.parametrize("max_pixels", [400_000, 56 * 56 * 4, 14 * 14 * 4 * 1280])
def test_smart_resize_matches_transformers(max_pixels):
    hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    for h, w in SIZES:
        assert smart_resize(h, w, max_pixels=max_pixels) == hf.smart_resize(h, w, max_pixels=max_pixels)


def test_smart_resize_rule_by_hand():
    assert smart_resize(56, 56) == (56, 56)
    assert smart_resize(100, 50) == (112, 56)  # round to multiples of 28
    h, w = smart_resize(1000, 2000, max_pixels=400_000)  # floor(1000/sqrt(5)/28)*28 = 420
    assert (h, w) == (420, 868) and h * w <= 400_000
    assert smart_resize(10, 10) == (56, 56)  # up to min_pixels
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


def test_load_image_converts_and_caps(tmp_path):
    rgba = Image.new("RGBA", (300, 200), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (300, 200)
    assert image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((5, 5)) == (255, 255, 255)
    capped = load_image(tmp_path / "a.png", max_pixels=28 * 28 * 20)
    w, h = capped.size
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 28 * 28 * 20
    assert (h, w) == smart_resize(200, 300, max_pixels=28 * 28 * 20)
    assert math.isclose(w / h, 1.5, rel_tol=0.25)
    Image.new("L", (56, 84), 7).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png", max_pixels=10**6).getpixel((0, 0)) == (7, 7, 7)
