"""Reading benchmark files: VLMEvalKit's layout, and every bad input named by file, row, reason."""
import json

import pytest
from evalkit_files import png_b64, write_tsv

from r1vl.eval import benchmarks, predictions
from r1vl.eval.tsv import EvalInputError, read_tsv

MCQ = {"question": "How many?", "A": "3", "B": "4", "answer": "A"}


def test_layout_quoting_references_and_image_path(tmp_path):
    img = png_b64()
    rows = [{"index": "1", "image": img, "question": 'tab\there "quoted"\nnew line', "answer": "Yes"},
            {"index": "2", "image": "1", "question": "q", "answer": "No"}]
    table = read_tsv(write_tsv(tmp_path / "a.tsv", rows))
    first, second = table.items
    assert first.fields["question"] == 'tab\there "quoted"\nnew line' and first.row == 1
    assert second.image_b64 == img and second.image_key == "1" and first.image_key == "1"
    assert second.image_bytes()[:4] == b"\x89PNG"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(first.image_bytes())
    by_path = read_tsv(write_tsv(tmp_path / "b.tsv", [{"index": "1", "image_path": "imgs/x.png", "question": "q",
                                                       "answer": "a"}], image=False))
    assert by_path.items[0].image_bytes() == first.image_bytes()


@pytest.mark.parametrize("rows, message", [
    ([{"index": "1", "question": "q"}], r"missing column\(s\) \['answer'\]"),
    ([{"index": "1", "question": "q", "answer": "a"}, {"index": "1", "question": "q", "answer": "b"}],
     r"row 2: index '1' repeats row 1"),
    ([{"index": "1", "image": "7", "question": "q", "answer": "a"}], r"row 1 \(index 1\): image refers to index '7'"),
    ([{"index": "", "question": "q", "answer": "a"}], r"row 1: empty index"),
])
def test_bad_files(tmp_path, rows, message):
    path = write_tsv(tmp_path / "bad.tsv", rows)
    with pytest.raises(EvalInputError, match=f"bad.tsv: .*{message}"):
        read_tsv(path)


def test_bad_structure(tmp_path):
    with pytest.raises(EvalInputError, match="no such file"):
        read_tsv(tmp_path / "none.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(EvalInputError, match="empty file"):
        read_tsv(tmp_path / "empty.tsv")
    (tmp_path / "short.tsv").write_text("index\timage\tquestion\tanswer\n1\tx\tq\n")
    with pytest.raises(EvalInputError, match=r"short.tsv: row 1: 3 fields, the header has 4"):
        read_tsv(tmp_path / "short.tsv")
    (tmp_path / "noimg.tsv").write_text("index\tquestion\tanswer\n1\tq\ta\n")
    with pytest.raises(EvalInputError, match="no image column"):
        read_tsv(tmp_path / "noimg.tsv")


def test_unknown_benchmark_and_row_checks(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'MMMU'"):
        benchmarks.get("MMMU")
    assert benchmarks.get("mathverse_mini").name == "MathVerse" and benchmarks.get("Math-V").name == "MathVision"
    # A gold answer VLMEvalKit never scores right is no reason to refuse the row.
    rows = [{"index": "0", **MCQ}, {"index": "1", **MCQ, "answer": "E"}]
    table = benchmarks.load(benchmarks.get("MMStar"), write_tsv(tmp_path / "mmstar.tsv", rows))
    assert [i.index for i in table.items] == ["0", "1"] and table.skipped == []


@pytest.mark.parametrize("name, row, message", [
    ("MathVista", {"question_type": "multi_choice", "answer_type": "text", "choices": "os.system('x')",
                   "answer": "a", "answer_option": "A"}, "choices is not a list literal"),
    ("MathVista", {"question_type": "multi_choice", "answer_type": "text", "choices": "['a']", "answer": "a"},
     "without the column 'answer_option'"),
    ("MathVista", {"question_type": "free_form", "answer_type": "integer"}, "missing column"),
    ("DynaMath", {"answer_type": "float", "answer": "x"}, "missing column"),
    ("HallusionBench", {"answer": "Yes"}, "the index is not"),
    ("MME", {"answer": "Yes", "category": ""}, "empty category"),
    ("MathVision", {"answer": "1", "choices": "['a',"}, "not a list literal"),
])
def test_malformed_rows_name_the_row(tmp_path, name, row, message):
    path = write_tsv(tmp_path / "x.tsv", [{"index": "5", "question": "q", **row}])
    with pytest.raises(EvalInputError, match=f"x.tsv: .*{message}"):
        benchmarks.load(benchmarks.get(name), path)


def test_predictions_resume_and_bad_lines(tmp_path):
    writer = predictions.Writer(tmp_path, rank=0)
    writer.write([{"index": "1", "prediction": "a"}, {"index": "2", "skipped": "bad image"}])
    writer.close()
    with (tmp_path / "predictions.rank0.jsonl").open("a") as f:
        f.write('{"index": "3", "predic')  # cut by a kill
    assert set(predictions.read_all(tmp_path)) == {"1", "2"}
    writer = predictions.Writer(tmp_path, rank=0)  # drops the partial line before appending
    writer.write([{"index": "3", "prediction": "c"}])
    writer.close()
    (tmp_path / "predictions.rank1.jsonl").write_text(json.dumps({"index": "1", "prediction": "other"}) + "\n")
    got = predictions.read_all(tmp_path)
    assert {k: v.get("prediction") for k, v in got.items()} == {"1": "a", "2": None, "3": "c"}
    (tmp_path / "predictions.rank2.jsonl").write_text('[1]\n{"index": "9", "prediction": "x"}\n')
    with pytest.raises(ValueError, match=r"predictions.rank2.jsonl: line 1: unreadable prediction"):
        predictions.read_all(tmp_path)


def test_na_strings_are_pandas_defaults():
    # pandas.read_csv's default na_values (besides '', an empty cell): the set VLMEvalKit's reader uses
    pytest.importorskip("pandas")
    from pandas._libs.parsers import STR_NA_VALUES

    from r1vl.eval.tsv import PANDAS_NA_STRINGS

    assert PANDAS_NA_STRINGS | {""} == STR_NA_VALUES


@pytest.mark.parametrize("keep_na_text", [False, True])
def test_missing_cells_as_pandas_reads_them(tmp_path, keep_na_text):
    # Every cell as pandas.read_csv(sep='\t') gives it (str() of it; '' where it is NaN), as VLMEvalKit
    # reads a benchmark file; with keep_na_text, as read_csv(keep_default_na=False, na_values=['']) does.
    pd = pytest.importorskip("pandas")
    from r1vl.eval.tsv import PANDAS_NA_STRINGS

    odd = [" NA", "NA ", "none", "NONE", "Nan", "na", "N/a", "-", "NaN%", "None."]  # look-alikes pandas keeps
    texts = sorted(PANDAS_NA_STRINGS) + odd
    # `number`: numbers and NA strings, float64 for pandas by default ("3" -> "3.0"), text with keep_na_text
    numbers = ["None", "3", "2.5", "3", "NA", "3", "2.5", "3", "nan", "3"]
    rows = [{"index": str(i), "image": png_b64(), "question": f"q{i}", "answer": "x", "text": text,
             "number": numbers[i % len(numbers)], "hint": "None" if i else "h"} for i, text in enumerate(texts)]
    rows.append({"index": "NA", "image": png_b64(), "question": "q", "answer": "NA", "text": '"quoted"',
                 "number": "", "hint": "NULL"})
    path = write_tsv(tmp_path / "na.tsv", rows)
    options = {"keep_default_na": False, "na_values": [""]} if keep_na_text else {}
    frame = pd.read_csv(path, sep="\t", **options)
    table = read_tsv(path, keep_na_text=keep_na_text)
    assert len(table.items) == len(frame)
    for item, (_, row) in zip(table.items, frame.iterrows()):
        assert item.index == rows[item.row - 1]["index"]  # the index is left as written
        for column in ("question", "answer", "text", "number", "hint"):
            want = "" if pd.isna(row[column]) else str(row[column])
            assert item.fields[column] == want, (item.index, column, row[column])
    assert pd.api.types.is_float_dtype(frame["number"]) != keep_na_text  # the case reaches both readings
    if not keep_na_text:  # the NA strings are gone, the look-alikes kept
        assert {i.fields["text"] for i in table.items} == set(odd) | {"", '"quoted"'}


def test_image_reading_as_missing_drops_the_row(tmp_path):
    # image_base.py skip_noimg: pd.isna(image) drops the row, and pandas reads "None" as missing
    rows = [{"index": "1", "image": png_b64(), "question": "q", "answer": "a"},
            {"index": "2", "image": "None", "question": "q", "answer": "a"}]
    table = read_tsv(write_tsv(tmp_path / "img.tsv", rows))
    assert [i.index for i in table.items] == ["1"] and table.no_image == ["2"]
