"""LookAhead answer preview: batched results equal the reference tool's one-record-at-a-time behaviour."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from workflow_scripts import preview
from workflow_scripts.io import DataError, records_to_table, write_table

DATA = Path(__file__).parent / "data" / "preview"
REPO = Path(__file__).resolve().parents[1]
CONNECTOR = " The answer begins with: "
P = "Let's solve this problem. "

TRICKY = [
    "", " ", "  two leading spaces", "\nnewline first", "\n\n\n", "trailing space ", "tabs\tand\ttabs",
    "1234567890123456789 digits", "3.14159, 2,718 and -42", "Café au lait ☕ costs €3",
    "日本語のテキストです",
    "🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂", "👩‍👩‍👧 family emoji", "don't won't it's we'll they've", "a", "Yes.",
    "<|im_end|> special token in text", "x<|endoftext|>y and more words after it",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "\u00a0nbsp\u3000ideographic space",
    "supercalifragilisticexpialidocious" * 4 + " end", "https://example.com/a/very/long/url?with=query&and=more",
    "line one\r\nline two\rline three", "  \n  \t mixed whitespace run before word",
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    pieces = list("abcXYZ 0123456789.,'!?#<>=*-\n\t") + [
        "é", "ß", "日本", "🙂", "👩‍👩‍👧", "\u00a0", "'s", "'ll", "<|im_end|>", "\r\n", "  ", "Ω", "١٢٣"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 90))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok(demo_tokenizer_dir):
    return AutoTokenizer.from_pretrained(demo_tokenizer_dir)


# ---------------------------------------------------------------- the oracle: the reference tool, plainly


def oracle(input_file, output_file, input_format, output_format, mode, input_field="input",
           output_field="output", m=6, P=P, connector=CONNECTOR, tokenizer=None,
           tokenizer_path=None) -> list[str]:
    """One record at a time, as zjunlp/LookAheadTuning main.py does it; returns what it prints."""
    with open(input_file, encoding="utf-8") as f:
        if input_format == "json":
            data = json.load(f)
        else:
            data = [json.loads(line) for line in f if line.strip()]
    printed = []
    for index, item in enumerate(data, 1):
        if input_field not in item:
            raise ValueError(f"Item {index} is missing the input_field '{input_field}'.")
        if output_field not in item:
            raise ValueError(f"Item {index} is missing the output_field '{output_field}'.")
        if mode == "real":
            head = tokenizer.convert_tokens_to_string(tokenizer.tokenize(item[output_field])[:m])
            item[input_field] = item[input_field] + connector + head
        else:
            item[input_field] = item[input_field] + connector + P
            item[output_field] = P + item[output_field]
        if index % 1000 == 0:
            printed.append(f"Processed {index} items...")
    with open(output_file, "w", encoding="utf-8") as f:
        if output_format == "json":
            json.dump(data, f, ensure_ascii=False, indent=4)
        else:
            for item in data:
                f.write(json.dumps(item) + "\n")
    printed.append(f"Processing complete. Output saved to '{output_file}' in {output_format.upper()} format.")
    return printed


def cli(args: dict) -> list[str]:
    argv = []
    for key, value in args.items():
        if key != "tokenizer":
            argv += [f"--{key}", str(value)]
    return argv


# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize("m", [0, 1, 2, 6, 11, 40, -1, -3])
def test_answer_previews_equal_reference(tok, m):
    texts = TRICKY + random_texts(400, seed=m + 100)
    assert preview.answer_previews(texts, tok, m) == [preview.reference_preview(t, tok, m) for t in texts]


def test_head_cut_is_used_and_exact_on_long_answers(tok):
    assert preview._head_is_exact(preview._backend(tok))
    # Long answers whose first m tokens need a widened head (long words, no early cut point).
    texts = ["x" * 500 + " tail", "a " * 300, ("word " * 3 + "verylongwordwithoutspaces" * 10 + " ") * 20,
             "🙂" * 200 + " then words", "1" * 300 + " ones"]
    for m in (1, 6, 30, 120):
        assert preview.answer_previews(texts, tok, m) == [preview.reference_preview(t, tok, m) for t in texts]


def test_non_backend_tokenizer_falls_back_to_reference():
    class Chars:
        def tokenize(self, text):
            return list(text)

        def convert_tokens_to_string(self, tokens):
            return "|".join(tokens)

    assert preview.answer_previews(["abcdef", ""], Chars(), 3) == ["a|b|c", ""]


def test_preview_texts_real(tok):
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    new_in, new_out = preview.preview_texts(["Q?"], [answer], "real", 6, tokenizer=tok)
    head = tok.convert_tokens_to_string(tok.tokenize(answer)[:6])
    assert head and answer.startswith(head) and head != answer
    assert new_in == ["Q?" + CONNECTOR + head] and new_out == [answer]


def test_preview_texts_short_zero_negative(tok):
    new_in, _ = preview.preview_texts(["q", "q", "q"], ["Yes.", "", "Yes."], "real", 6, tokenizer=tok)
    assert new_in == ["q The answer begins with: Yes.", "q The answer begins with: ", new_in[2]]
    zero, _ = preview.preview_texts(["q"], ["Yes it is."], "real", 0, tokenizer=tok)
    assert zero == ["q The answer begins with: "]
    neg, _ = preview.preview_texts(["q"], ["Yes it is."], "real", -1, tokenizer=tok)
    head = tok.convert_tokens_to_string(tok.tokenize("Yes it is.")[:-1])
    assert neg == ["q The answer begins with: " + head]
    assert neg[0].endswith("Yes it is")


def test_preview_texts_virtual_and_connector():
    new_in, new_out = preview.preview_texts(["Q", " Q "], ["A", ""], "virtual")
    assert new_in == ["Q The answer begins with: Let's solve this problem. ",
                      " Q  The answer begins with: Let's solve this problem. "]
    assert new_out == ["Let's solve this problem. A", "Let's solve this problem. "]
    new_in, new_out = preview.preview_texts(["Q"], ["A"], "virtual", P=" P ", connector="\n->")
    assert (new_in, new_out) == (["Q\n-> P "], [" P A"])
    with pytest.raises(ValueError, match="mode"):
        preview.preview_texts(["Q"], ["A"], "imaginary")


# ---------------------------------------------------------------- CLI vs the oracle, byte for byte


CASES = [
    ("jsonl", "jsonl", "real", {}),
    ("jsonl", "json", "real", {"m": 2}),
    ("jsonl", "jsonl", "virtual", {"P": " Let's solve this problem. ", "connector": " → "}),
    ("jsonl", "json", "virtual", {}),
    ("jsonl", "jsonl", "real", {"m": 0}),
    ("jsonl", "jsonl", "real", {"m": -2}),
    ("jsonl", "jsonl", "real", {"m": 1000}),
    ("jsonl", "jsonl", "real", {"output_field": "question", "input_field": "answer"}),
    ("jsonl", "jsonl", "real", {"output_field": "answer", "input_field": "answer"}),
    ("jsonl", "json", "virtual", {"output_field": "answer", "input_field": "answer"}),
]


@pytest.mark.parametrize("batch_size", [1, 3, 4096])
@pytest.mark.parametrize(("fin", "fout", "mode", "extra"), CASES)
def test_cli_matches_reference(tmp_path, demo_tokenizer_dir, tok, capsys, fin, fout, mode, extra,
                               batch_size):
    args = {"input_file": DATA / "gsm8k_small.jsonl", "input_format": fin, "output_format": fout,
            "mode": mode,
            "input_field": "question", "output_field": "answer", "tokenizer_path": demo_tokenizer_dir} | extra
    want_printed = oracle(**(args | {"output_file": tmp_path / "want", "tokenizer": tok}))
    assert preview.main(cli(args | {"output_file": tmp_path / "got", "batch_size": batch_size})) == 0
    assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes()
    printed = capsys.readouterr().out.splitlines()
    assert printed == [line.replace("want", "got") for line in want_printed]


@pytest.mark.parametrize("fout", ["json", "jsonl"])
def test_cli_json_input_custom_fields(tmp_path, demo_tokenizer_dir, tok, fout):
    args = {"input_file": DATA / "instructions.json", "input_format": "json", "output_format": fout,
            "mode": "real", "input_field": "instruction", "output_field": "response", "m": 3,
            "tokenizer_path": demo_tokenizer_dir}
    oracle(**(args | {"output_file": tmp_path / "want", "tokenizer": tok}))
    assert preview.main(cli(args | {"output_file": tmp_path / "got", "batch_size": 2})) == 0
    got = (tmp_path / "got").read_bytes()
    assert got == (tmp_path / "want").read_bytes()
    if fout == "json":
        assert not got.endswith(b"\n") and "é".encode() in got and got.startswith(b"[\n    {\n        ")
    else:
        assert got.endswith(b"\n") and got.isascii()


def test_cli_keeps_key_order_skips_blank_lines_and_reports_progress(tmp_path, capsys):
    rows = [{"z": i, "output": f"answer {i} ✓", "input": f"q{i}", "a": None} for i in range(2500)]
    src = tmp_path / "in.jsonl"
    src.write_text("\r\n".join(json.dumps(r) for r in rows[:10]) + "\n\n  \n"
                   + "\n".join(json.dumps(r) for r in rows[10:]) + "\n\n", encoding="utf-8")
    want = oracle(src, tmp_path / "want.jsonl", "jsonl", "jsonl", "virtual")
    argv = ["--input_file", str(src), "--output_file", str(tmp_path / "got.jsonl"), "--input_format", "jsonl",
            "--output_format", "jsonl", "--mode", "virtual", "--batch_size", "700"]
    assert preview.main(argv) == 0
    assert (tmp_path / "got.jsonl").read_bytes() == (tmp_path / "want.jsonl").read_bytes()
    out = [json.loads(line) for line in (tmp_path / "got.jsonl").read_text().splitlines()]
    assert len(out) == 2500 and list(out[0]) == ["z", "output", "input", "a"]
    assert out[0]["output"] == "Let's solve this problem. answer 0 ✓"
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["Processed 1000 items...", "Processed 2000 items..."]
    assert printed == [line.replace("want", "got") for line in want]


def test_cli_empty_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n \n")
    for fout, want in (("json", "[]"), ("jsonl", "")):
        argv = ["--input_file", str(tmp_path / "empty.jsonl"), "--output_file", str(tmp_path / f"o.{fout}"),
                "--input_format", "jsonl", "--output_format", fout, "--mode", "virtual"]
        assert preview.main(argv) == 0
        assert (tmp_path / f"o.{fout}").read_text() == want


@pytest.mark.parametrize(("field", "line"), [
    ("input", "ValueError: Item 3 is missing the input_field 'question'."),
    ("output", "ValueError: Item 3 is missing the output_field 'answer'."),
])
def test_missing_field_exit_code_and_no_output(tmp_path, field, line):
    rows = [{"question": "q", "answer": "a"}] * 4
    rows[2] = {"answer": "a"} if field == "input" else {"question": "q"}
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=line.split(": ", 1)[1].replace(".", r"\.")):
        oracle(src, tmp_path / "ref.jsonl", "jsonl", "jsonl", "virtual", "question", "answer")
    out = tmp_path / "out" / "o.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.preview", "--input_file", str(src),
         "--output_file", str(out), "--input_format", "jsonl", "--output_format", "jsonl",
         "--mode", "virtual", "--input_field", "question", "--output_field", "answer", "--batch_size", "2"],
        cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    kind, message = line.split(": ", 1)
    # The reference's wording, with the input file named in front of it.
    assert proc.stderr.strip().splitlines()[-1] == f"{kind}: {src}: {message}"
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_read_error_later_in_file_wins_like_reference(tmp_path, capsys):
    # The reference reads the whole file before checking items, so a bad line 5 beats a missing field at 1.
    src = tmp_path / "in.jsonl"
    src.write_text('{"output": "a"}\n{"input": "q", "output": "a"}\n\n\n{oops\n')
    argv = ["--input_file", str(src), "--output_file", str(tmp_path / "o.json"), "--input_format", "jsonl",
            "--output_format", "json", "--mode", "virtual", "--batch_size", "1"]
    assert preview.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"RuntimeError: Failed to read JSONL file '{src}': JSON decode error at line 5: ")
    assert not (tmp_path / "o.json").exists()


def test_bad_tokenizer_path(tmp_path, capsys):
    argv = ["--input_file", str(DATA / "gsm8k_small.jsonl"), "--output_file", str(tmp_path / "o.jsonl"),
            "--input_format", "jsonl", "--output_format", "jsonl", "--mode", "real",
            "--input_field", "question", "--output_field", "answer",
            "--tokenizer_path", str(tmp_path / "nope")]
    assert preview.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"RuntimeError: Failed to load tokenizer from '{tmp_path}/nope': ")
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------- canonical Parquet tables


def conversations() -> list[dict]:
    return [
        {"id": "a", "source": "gsm8k", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": "First answer, untouched."},
            {"role": "user", "content": "How many clips?"},
            {"role": "assistant", "content": "Natalia sold 48/2 = 24 clips.\n#### 72"}]},
        {"id": "b", "source": "gsm8k", "messages": [
            {"role": "user", "content": "Café?"}, {"role": "assistant", "content": "🙂 Oui."}]},
    ]


@pytest.mark.parametrize("mode", ["real", "virtual"])
def test_parquet_cli_with_decisions(tmp_path, demo_tokenizer_dir, tok, mode):
    records = conversations()
    write_table(records_to_table(records), tmp_path / "in.parquet")
    argv = ["--input_file", str(tmp_path / "in.parquet"), "--output_file", str(tmp_path / "out.parquet"),
            "--input_format", "parquet", "--output_format", "parquet", "--mode", mode, "--m", "4",
            "--tokenizer_path", str(demo_tokenizer_dir), "--decisions_file", str(tmp_path / "dec.parquet")]
    assert preview.main(argv) == 0
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema == records_to_table(records).schema
    got = out.to_pylist()
    assert [r["id"] for r in got] == ["a", "b"] and [r["source"] for r in got] == ["gsm8k", "gsm8k"]
    for before, after in zip(records, got, strict=True):
        msgs, new = before["messages"], after["messages"]
        user = max(i for i, x in enumerate(msgs) if x["role"] == "user")
        bot = max(i for i, x in enumerate(msgs) if x["role"] == "assistant")
        if mode == "real":
            head = preview.reference_preview(msgs[bot]["content"], tok, 4)
            want_user, want_bot = msgs[user]["content"] + CONNECTOR + head, msgs[bot]["content"]
        else:
            want_user, want_bot = msgs[user]["content"] + CONNECTOR + P, P + msgs[bot]["content"]
        assert new[user]["content"] == want_user and new[bot]["content"] == want_bot
        untouched = [i for i in range(len(msgs)) if i not in (user, bot)]
        assert [new[i] for i in untouched] == [msgs[i] for i in untouched]
    dec = pq.read_table(tmp_path / "dec.parquet").to_pylist()
    reason = "preview:real:m=4" if mode == "real" else "preview:virtual"
    assert dec == [{"id": i, "kept": True, "reason": reason, "score": None} for i in ("a", "b")]


def test_parquet_missing_turn_is_a_data_error(tmp_path, capsys):
    records = conversations()
    records[1]["messages"] = [{"role": "user", "content": "no reply"}]
    table = records_to_table(records)
    with pytest.raises(DataError, match=r"t.parquet: row 1: field 'messages': no assistant turn"):
        preview.preview_table(table, None, "virtual", source="t.parquet")
    records[1]["messages"] = [{"role": "assistant", "content": "no question"}]
    write_table(records_to_table(records), tmp_path / "in.parquet")
    argv = ["--input_file", str(tmp_path / "in.parquet"), "--output_file", str(tmp_path / "out.parquet"),
            "--input_format", "parquet", "--output_format", "parquet", "--mode", "virtual",
            "--decisions_file", str(tmp_path / "dec.parquet")]
    assert preview.main(argv) == 1
    assert "row 1: field 'messages': no user turn" in capsys.readouterr().err
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "dec.parquet").exists()


def test_parquet_needs_parquet_both_ways(tmp_path):
    with pytest.raises(SystemExit) as exc:
        preview.parse_args(["--input_file", "x", "--output_file", "y", "--input_format", "parquet",
                            "--output_format", "jsonl", "--mode", "virtual"])
    assert exc.value.code == 2


def test_jsonl_lines_json_loads_accepts_but_a_fast_parse_would_not(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('  {"input": "a", "output": "b"}  \n\t{"input": "é", "output": "ü"}\r\n'
                   '{"input": "c", "output": "d", "n": [1.50, 1e3, NaN]}', encoding="utf-8")
    oracle(src, tmp_path / "want.jsonl", "jsonl", "jsonl", "virtual")
    argv = ["--input_file", str(src), "--output_file", str(tmp_path / "got.jsonl"), "--input_format", "jsonl",
            "--output_format", "jsonl", "--mode", "virtual"]
    assert preview.main(argv) == 0
    assert (tmp_path / "got.jsonl").read_bytes() == (tmp_path / "want.jsonl").read_bytes()
    # Two values on one line: json.loads rejects it, and so must we, with its message.
    src.write_text('{"input": "a", "output": "b"}\n{"input": "a", "output": "b"} {"x": 1}\n')
    try:
        json.loads('{"input": "a", "output": "b"} {"x": 1}\n')
    except json.JSONDecodeError as e:
        want = f"RuntimeError: Failed to read JSONL file '{src}': JSON decode error at line 2: {e}"
    assert preview.main(argv) == 1
    assert capsys.readouterr().err.strip() == want


def test_wrong_typed_field_names_the_file(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": 7}\n')
    argv = ["--input_file", str(src), "--output_file", str(tmp_path / "o.jsonl"), "--input_format", "jsonl",
            "--output_format", "jsonl", "--mode", "virtual", "--input_field", "question", "--output_field", "answer"]
    assert preview.main(argv) == 1
    assert capsys.readouterr().err.strip() == f"TypeError: {src}: Item 2: field 'answer' is a int, not a string."
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------- the workflow's way in: --options


def test_options_defaults_are_the_reference_defaults():
    assert preview.PreviewOptions() == preview.PreviewOptions(mode="real", m=6, P=P, connector=CONNECTOR)


def test_options_json_gives_what_the_flags_give(tmp_path, demo_tokenizer_dir):
    write_table(records_to_table(conversations()), tmp_path / "in.parquet")
    common = ["--input_file", str(tmp_path / "in.parquet"), "--input_format", "parquet", "--output_format",
              "parquet", "--tokenizer_path", str(demo_tokenizer_dir)]
    for mode in ("real", "virtual"):
        flags, options = tmp_path / f"flags_{mode}.parquet", tmp_path / f"options_{mode}.parquet"
        assert preview.main([*common, "--output_file", str(flags), "--mode", mode, "--m", "3", "--connector",
                             " → "]) == 0
        as_json = json.dumps({"mode": mode, "m": 3, "connector": " → "})
        assert preview.main([*common, "--output_file", str(options), "--options", as_json]) == 0
        assert pq.read_table(options).equals(pq.read_table(flags))


def test_options_json_defaults_flags_and_errors(capsys):
    common = ["--input_file", "x", "--output_file", "y", "--input_format", "jsonl", "--output_format", "jsonl"]
    assert preview.parse_args([*common, "--options", "{}"]).options == preview.PreviewOptions()
    args = preview.parse_args([*common, "--options", '{"mode": "virtual", "m": 2}', "--m", "3"])
    assert args.options == preview.PreviewOptions(mode="virtual", m=3)  # a flag wins over the JSON
    for argv, message in [
        ([], "the following arguments are required: --mode"),
        (["--options", '{"mm": 1}'], "preview has no option 'mm'"),
        (["--options", '{"mode": "imaginary"}'], "unknown mode 'imaginary'"),
        (["--options", "[1]"], "--options must be a JSON object"),
    ]:
        with pytest.raises(SystemExit) as exc:
            preview.parse_args(common + argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
