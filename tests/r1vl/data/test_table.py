"""--data in every schema and storage form: each read to the same training input (the encoded
prompt's ids and pixels, the reference, the key steps); the columns kept for reward functions;
each data error found at start-up as one `error:` line."""
import io
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import train
from r1vl.data.prompts import encode_prompt
from r1vl.data.records import BadRecordError, load_examples
from r1vl.data.table import TableOptions, open_examples
from r1vl.tiny import build_tokenizer

QUESTION, TWO_QUESTION = "What colour is the shape?", "Which image is red?"


def _png(colour, size) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """img/a.png (red), img/b.png (blue, another size)."""
    root = tmp_path_factory.mktemp("table")
    (root / "img").mkdir()
    (root / "img" / "a.png").write_bytes(_png("red", (40, 30)))
    (root / "img" / "b.png").write_bytes(_png("blue", (30, 50)))
    return root


@pytest.fixture(scope="module")
def encoder():
    tokenizer = build_tokenizer([QUESTION, TWO_QUESTION, "red", "first"], vocab_size=300)
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    return lambda e: encode_prompt(e, tokenizer, processor, 2, 56 * 56, 28 * 28)


def _trains_as(encoder, table) -> list:
    """What each Example trains on: prompt ids, pixel rows, grids, reference, key steps."""
    out = []
    for e in table:
        p = encoder(e)
        out.append((p.ids.tolist(), p.pixel_values.numpy().tobytes(), p.image_grid_thw.tolist(), e.solution,
                    e.key_steps))
    return out


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _open(path, **options):
    return open_examples(TableOptions(str(path), **options))


def _image_struct_features():
    return datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                              "images": datasets.List(datasets.Image())})


# --------------------------------------------------------------------------- one image per prompt

def test_one_image_in_every_schema_and_storage_form_trains_alike(root, encoder, tmp_path):
    a, b = (root / "img" / "a.png").read_bytes(), (root / "img" / "b.png").read_bytes()
    rows = [("red", a), ("blue", b)]
    forms = {}
    # EasyR1, images as relative paths in JSONL (relative to the data file).
    forms["easyr1 jsonl paths"] = _open(_jsonl(root / "easyr1.jsonl", [
        {"problem": "<image>" + QUESTION, "answer": ans, "images": [f"img/{n}.png"]}
        for (ans, _), n in zip(rows, "ab")]))
    # ... absolute paths, the file elsewhere.
    forms["easyr1 json absolute"] = _open(_jsonl(tmp_path / "abs.jsonl", [
        {"problem": "<image>" + QUESTION, "answer": ans, "images": [str(root / "img" / f"{n}.png")]}
        for (ans, _), n in zip(rows, "ab")]))
    # ... paths relative to --image_root.
    forms["easyr1 image_root"] = _open(_jsonl(tmp_path / "rooted.jsonl", [
        {"problem": "<image>" + QUESTION, "answer": ans, "images": [f"{n}.png"]} for (ans, _), n in zip(rows, "ab")]),
        image_root=str(root / "img"))
    # EasyR1 Parquet written by pyarrow alone: images as {"bytes", "path"} structs, no HF metadata.
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"problem": ["<image>" + QUESTION] * 2, "answer": [r[0] for r in rows],
                             "images": pa.array([[{"bytes": r[1], "path": None}] for r in rows],
                                                pa.list_(struct))}), tmp_path / "easyr1.parquet")
    forms["easyr1 parquet structs"] = _open(tmp_path / "easyr1.parquet")
    # The same through `datasets` (Image features): save_to_disk, and Parquet shards with HF metadata.
    hf = datasets.Dataset.from_dict({"problem": ["<image>" + QUESTION] * 2, "answer": [r[0] for r in rows],
                                     "images": [[{"bytes": r[1], "path": None}] for r in rows]},
                                    features=_image_struct_features())
    hf.save_to_disk(str(tmp_path / "saved"))
    forms["easyr1 save_to_disk"] = _open(tmp_path / "saved")
    (tmp_path / "shards").mkdir()
    hf.select([0]).to_parquet(str(tmp_path / "shards" / "part-0.parquet"))
    hf.select([1]).to_parquet(str(tmp_path / "shards" / "part-1.parquet"))
    forms["easyr1 parquet shards"] = _open(tmp_path / "shards")
    # R1-V: one `image` (an Image feature), no tag, the answer in <answer> tags.
    r1v = datasets.Dataset.from_dict({"image": [{"bytes": r[1], "path": None} for r in rows],
                                      "problem": [QUESTION] * 2,
                                      "solution": [f"<answer> {r[0]} </answer>" for r in rows]},
                                     features=datasets.Features({"image": datasets.Image(),
                                                                 "problem": datasets.Value("string"),
                                                                 "solution": datasets.Value("string")}))
    r1v.save_to_disk(str(tmp_path / "r1v"))
    forms["r1-v save_to_disk"] = _open(tmp_path / "r1v")
    # Raw bytes in a binary column, named with --image_key / --prompt_key / --answer_key.
    pq.write_table(pa.table({"picture": pa.array([r[1] for r in rows], pa.binary()), "q": [QUESTION] * 2,
                             "gold": [r[0] for r in rows]}), tmp_path / "raw.parquet")
    forms["raw bytes, keys named"] = _open(tmp_path / "raw.parquet", image_key="picture", prompt_key="q",
                                           answer_key="gold")
    # TRL: a conversational prompt and one `image`.
    forms["trl jsonl"] = _open(_jsonl(root / "trl1.jsonl", [
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
         "image": f"img/{n}.png", "solution": ans} for (ans, _), n in zip(rows, "ab")]))

    expected = _trains_as(encoder, forms.pop("easyr1 jsonl paths"))
    assert [e[3] for e in expected] == ["red", "blue"]
    assert len(expected[0][0]) > 10 and expected[0][0] != expected[1][0]  # the images' sizes differ
    for name, table in forms.items():
        assert _trains_as(encoder, table) == expected, name


def test_r1vl_records_read_to_exactly_todays_examples(root, tmp_path):
    steps = {"Steps": ["3 red", ["12/2=6", "\\frac{12}{2}=6"]]}  # mixed: Arrow cannot type it
    records = [{"image_path": "img/a.png", "problem": "q0", "solution": "s\n### The final answer is:\n6",
                "key_steps": steps},
               {"image_path": "img/b.png", "problem": "q1", "solution": "t\n### The final answer is:\n7"}]
    for name, recs in (("mixed.jsonl", records), ("plain.jsonl", [dict(r, key_steps={"Steps": ["a", "b"]})
                                                                   for r in records])):
        path = _jsonl(root / name, recs)
        table = _open(path)
        assert list(table) == load_examples(path).items
        assert [e.source for e in table] == [f"{path}:0", f"{path}:1"]
    (root / "list.json").write_text(json.dumps(records))
    assert list(_open(root / "list.json")) == load_examples(root / "list.json").items
    assert _open(root / "mixed.jsonl")[0].key_steps == (("3 red",), ("12/2=6", "\\frac{12}{2}=6"))


def test_answer_only_records_have_no_key_steps_and_score_by_the_answer(root):
    from r1vl.rewards.score import RewardConfig, score

    table = _open(_jsonl(root / "answers.jsonl", [{"problem": "<image>q", "answer": "6", "images": ["img/a.png"]}]))
    e = table[0]
    assert (e.solution, e.key_steps) == ("6", ())
    good = "### Step 1:\nsix\n### The final answer is:\n6"
    out = score([good, good.replace("6", "7")], [e, e], RewardConfig(symbolic=False))
    assert out.accuracy.tolist() == [1.0, 0.0] and out.key_step_match.tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- two images per prompt

def test_two_images_trl_and_easyr1_train_alike_and_keep_their_columns(root, encoder, tmp_path):
    a, b = (root / "img" / "a.png").read_bytes(), (root / "img" / "b.png").read_bytes()
    trl = _open(_jsonl(root / "trl2.jsonl", [
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                  {"type": "text", "text": TWO_QUESTION}]}],
         "images": ["img/a.png", "img/b.png"], "solution": "first", "category": "colour"}]), max_images=2)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"problem": ["<image><image>" + TWO_QUESTION], "answer": ["first"],
                             "images": pa.array([[{"bytes": a, "path": None}, {"bytes": b, "path": None}]],
                                                pa.list_(struct))}), tmp_path / "two.parquet")
    easyr1 = _open(tmp_path / "two.parquet", max_images=2)
    got = _trains_as(encoder, trl)
    assert got == _trains_as(encoder, easyr1)
    assert len(got[0][2]) == 2  # two grids
    e = trl[0]
    assert e.columns["category"] == "colour" and e.columns["images"] == ["img/a.png", "img/b.png"]
    pil = e.pil_images()
    assert [im.size for im in pil] == [(40, 30), (30, 50)] and np.asarray(pil[1])[0, 0].tolist() == [0, 0, 255]
    assert trl[0].problem == TWO_QUESTION


def test_the_table_reads_rows_lazily(root, monkeypatch):
    import r1vl.data.table as table_module

    table = _open(_jsonl(root / "lazy.jsonl", [{"problem": "q", "answer": str(i), "images": ["img/a.png"]}
                                                for i in range(50)]))
    made = []
    real = table_module.row_example
    monkeypatch.setattr(table_module, "row_example", lambda *a, **k: made.append(1) or real(*a, **k))
    assert table[7].solution == "7" and [e.solution for e in table[48:]] == ["48", "49"] and len(made) == 3


# --------------------------------------------------------------------------- start-up errors

def _bad_cases(root, tmp_path):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"problem": [1, 2], "answer": ["a", "b"], "images": [["img/a.png"]] * 2}),
                   tmp_path / "int.parquet")
    pq.write_table(pa.table({"problem": ["<image>q"] * 2, "answer": ["a", "b"],
                             "images": pa.array([[{"bytes": _png("red", (9, 9)), "path": None}],
                                                 [{"bytes": b"not an image", "path": None}]], pa.list_(struct))}),
                   tmp_path / "corrupt.parquet")
    good = {"problem": "<image>q", "answer": "a", "images": ["img/a.png"]}
    return {
        "missing column": (_jsonl(root / "bad_m.jsonl", [{"text": "q", "answer": "a", "images": ["img/a.png"]}]),
                           "no prompt column"),
        "wrong type": (tmp_path / "int.parquet", "column 'problem' is int64, expected a string"),
        "corrupt image": (tmp_path / "corrupt.parquet", "record 1: corrupt image (12 bytes)"),
        "missing image": (_jsonl(root / "missing.jsonl", [good, dict(good, images=["img/none.png"])]),
                          "record 1: image not found"),
        "tag count": (_jsonl(root / "bad_t.jsonl", [good, dict(good, problem="<image><image>q")]),
                      "record 1: 2 <image> tags in 'problem' but 1 image(s) in 'images'"),
        "max images": (_jsonl(root / "two.jsonl", [dict(good, problem="q", images=["img/a.png", "img/b.png"])]),
                       "record 0: 2 images, more than --max_images 1"),
        "video": (_jsonl(root / "bad_v.jsonl", [dict(good, videos=["x.mp4"])]), "videos are not supported"),
        "no reference": (_jsonl(root / "noref.jsonl", [{"problem": "q", "images": ["img/a.png"]}]), "no reference"),
    }


def test_each_data_error_is_one_error_line_before_the_model_loads(root, tmp_path, capsys, monkeypatch):
    import r1vl.model.policy

    monkeypatch.setattr(r1vl.model.policy, "load_trainable", lambda *a, **k: pytest.fail("the model loaded"))
    for name, (path, message) in _bad_cases(root, tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--data", str(path), "--run_dir", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, name
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (name, err)
        assert "Traceback" not in err


def test_skip_bad_records_leaves_them_out_and_lists_them(root, tmp_path, caplog):
    good = {"problem": "<image>q", "answer": "a", "images": ["img/a.png"]}
    path = _jsonl(root / "skip.jsonl", [good, dict(good, images=["img/none.png"]), dict(good, answer="b"),
                                             dict(good, problem="<image><image>q")])
    with pytest.raises(BadRecordError, match="record 1: image not found"):
        _open(path)
    table = _open(path, skip_bad_records=True)
    assert [e.solution for e in table] == ["a", "b"] and [b.index for b in table.bad] == [1, 3]
    assert "skipped 2 bad" in table.summary() and "record 3: 2 <image> tags" in caplog.text


def test_lazy_image_check_names_the_record_when_the_image_is_used(root, tmp_path):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"problem": ["<image>q"], "answer": ["a"],
                             "images": pa.array([[{"bytes": b"not an image", "path": None}]], pa.list_(struct))}),
                   tmp_path / "lazy.parquet")
    table = _open(tmp_path / "lazy.parquet", check_images="lazy")
    tokenizer = build_tokenizer(["q"], vocab_size=300)
    with pytest.raises(BadRecordError, match=r"lazy.parquet: record 0: cannot read image \(12 bytes\)"):
        encode_prompt(table[0], tokenizer, Qwen2VLImageProcessorPil(), 2, 56 * 56, 28 * 28)


def test_a_dataset_dict_gives_its_train_split(root, encoder, tmp_path):
    rows = {"problem": ["<image>" + QUESTION], "answer": ["red"], "images": [["img/a.png"]]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict(dict(rows, answer=["x"]))}).save_to_disk(str(tmp_path / "dd"))
    table = _open(tmp_path / "dd", image_root=str(root))
    assert [e.solution for e in table] == ["red"] and "split train" in table.summary()
    datasets.DatasetDict({"a": datasets.Dataset.from_dict(rows), "b": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "ab"))
    with pytest.raises(ValueError, match="none named train"):
        _open(tmp_path / "ab")
