"""LookAhead Tuning's partial answer preview: append a connector and the answer's first m tokens (real mode)
or a fixed phrase P (virtual mode, also prepended to the answer) to each training prompt.

A drop-in for the reference `main.py` of zjunlp/LookAheadTuning (same flags, byte-identical JSON/JSONL output,
same error text and exit code), batched and streaming, plus canonical Parquet tables for the pipeline. The
workflow hands a step's options over as one JSON object (`--options`), parsed into PreviewOptions.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from workflow_scripts.io import DataError, atomic_file, decisions_table, last_turn, read_table, write_table
from workflow_scripts.methods import options_from_cli

BATCH_SIZE = 4096
PROGRESS_EVERY = 1000  # the reference prints "Processed N items..." at every multiple of this

# Pre-tokenizer regexes for which cutting the text just before a space that follows a printable ASCII
# character provably splits it on a pre-token boundary (no alternative can match "X " with X non-space, and
# none looks more than one character ahead), so the head's tokens are a prefix of the whole text's tokens:
# ByteLevel's own GPT-2 regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)
# and these Split patterns.
_SAFE_SPLIT_PATTERNS = {
    # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
    # Qwen 2 / 2.5 / 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
}


@functools.lru_cache(maxsize=8)
def _head_pattern(m: int) -> re.Pattern:
    """Matches the text up to its m-th cut point: a printable ASCII character followed by a space."""
    # Atomic, so a text with fewer cut points fails in linear time instead of backtracking through them.
    return re.compile(r"(?:(?>.*?[!-~](?= ))){" + str(m) + "}", re.S)


@dataclass(frozen=True)
class PreviewOptions:
    """A preview step's options (config.yaml, `--options` or the reference flags): the one home of their defaults."""

    mode: str = "real"
    m: int = 6
    P: str = "Let's solve this problem. "
    connector: str = " The answer begins with: "

    def __post_init__(self):
        if self.mode not in ("real", "virtual"):
            raise ValueError(f"unknown mode {self.mode!r}: expected 'real' or 'virtual'")


class PreviewError(Exception):
    """A failure the reference tool reports as an uncaught `kind: message`; we print that line and exit 1."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


# ---------------------------------------------------------------- tokenizer side


def reference_preview(text: str, tokenizer, m: int) -> str:
    """The reference definition, one text at a time: convert_tokens_to_string(tokenize(text)[:m])."""
    return tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)[:m])


def _backend(tokenizer):
    """The Rust tokenizer, if `tokenizer` tokenizes exactly as TokenizersBackend does; else None."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - older transformers
        return None
    if not isinstance(tokenizer, TokenizersBackend):
        return None
    cls = type(tokenizer)
    # Subclasses that reimplement these would not match a direct backend call.
    for name in ("tokenize", "_encode_plus", "convert_tokens_to_string"):
        if getattr(cls, name) is not getattr(TokenizersBackend, name):
            return None
    return tokenizer.backend_tokenizer


def _component(obj) -> dict | None:
    return None if obj is None else json.loads(obj.__getstate__())


def _head_is_exact(bt) -> bool:
    """Whether a head cut by _head_pattern tokenizes to a prefix of the whole text's tokens here."""
    from tokenizers import models

    if bt.normalizer is not None or not isinstance(bt.model, models.BPE) or bt.model.dropout:
        return False
    pre = _component(bt.pre_tokenizer)
    if pre is None:
        return False
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if steps[0].get("type") == "ByteLevel":
        if len(steps) != 1 or not steps[0].get("use_regex", True):
            return False
    elif steps[0].get("type") == "Split":
        split = steps[0]
        if (split.get("pattern", {}).get("Regex") not in _SAFE_SPLIT_PATTERNS or split.get("invert")
                or split.get("behavior") != "Isolated"):
            return False
        if any(s.get("type") != "ByteLevel" or s.get("use_regex", True) for s in steps[1:]):
            return False
    else:
        return False
    # Added tokens are matched before pre-tokenization: one spanning the cut (it would contain a space) or
    # one that swallows neighbouring spaces would change the head.
    for added in bt.get_added_tokens_decoder().values():
        if added.lstrip or added.rstrip or added.single_word or any(c.isspace() for c in added.content):
            return False
    return True


def _backend_decode(bt):
    decoder = bt.decoder
    return decoder.decode if decoder is not None else " ".join


def answer_previews(texts: list[str], tokenizer, m: int) -> list[str]:
    """convert_tokens_to_string(tokenize(t)[:m]) for every t, batched; equal to reference_preview per item."""
    bt = _backend(tokenizer)
    if bt is None:
        return [reference_preview(t, tokenizer, m) for t in texts]
    # tokenize() switches truncation and padding off and syncs split_special_tokens before encoding;
    # do the same so the backend is in the state the reference would see.
    if bt.truncation is not None:
        bt.no_truncation()
    if bt.padding is not None:
        bt.no_padding()
    if bt.encode_special_tokens != tokenizer.split_special_tokens:
        bt.encode_special_tokens = tokenizer.split_special_tokens
    decode = _backend_decode(bt)
    if m == 0:
        return [decode([])] * len(texts)
    if m < 0 or not _head_is_exact(bt):
        encodings = bt.encode_batch(texts, add_special_tokens=False)
        return [decode(e.tokens[:m]) for e in encodings]

    # Only the first m tokens matter, and encoding the whole answer dominates the cost. Every cut point is
    # a pre-token boundary and each pre-token yields at least one token, so the head up to the m-th cut
    # point holds at least m tokens, and they are the whole text's first ones.
    head = _head_pattern(m).match
    heads = []
    for text in texts:
        cut = head(text)
        heads.append(text[: cut.end()] if cut else text)
    return [decode(e.tokens[:m]) for e in bt.encode_batch(heads, add_special_tokens=False)]


def preview_texts(inputs: list[str], outputs: list[str], mode: str, m: int = PreviewOptions.m,
                  P: str = PreviewOptions.P, connector: str = PreviewOptions.connector,
                  tokenizer=None) -> tuple[list[str], list[str]]:
    """New (inputs, outputs): real appends connector + the answer's first m tokens to the input and keeps the
    answer; virtual appends connector + P to the input and prepends P to the answer."""
    if mode == "real":
        if tokenizer is None:
            raise ValueError("real mode needs a tokenizer")
        previews = answer_previews(list(outputs), tokenizer, m)
        return [i + connector + p for i, p in zip(inputs, previews, strict=True)], list(outputs)
    if mode == "virtual":
        return [i + connector + P for i in inputs], [P + o for o in outputs]
    raise ValueError(f"unknown mode {mode!r}: expected 'real' or 'virtual'")


def _reason(mode: str, m: int) -> str:
    return f"preview:real:m={m}" if mode == "real" else "preview:virtual"


def preview_table(table: pa.Table, tokenizer, mode: str, m: int = PreviewOptions.m,
                  P: str = PreviewOptions.P, connector: str = PreviewOptions.connector, source: str = "<table>",
                  batch_size: int = BATCH_SIZE) -> tuple[pa.Table, pa.Table]:
    """Preview a canonical table: the last user turn is the input, the last assistant turn the answer.

    Returns the table with only those turns changed, and a decisions table keeping every record.
    """
    messages_type = table.schema.field("messages").type
    column = table.column("messages")
    chunks = []
    for start in range(0, table.num_rows, batch_size):
        rows = column.slice(start, batch_size).to_pylist()
        where = []
        for offset, messages in enumerate(rows):
            row = start + offset
            if messages is None:
                raise DataError(source, row, "messages", "is null")
            user, assistant = last_turn(messages, "user"), last_turn(messages, "assistant")
            if user < 0:
                raise DataError(source, row, "messages", "no user turn to put the preview in")
            if assistant < 0:
                raise DataError(source, row, "messages", "no assistant turn to preview")
            for turn in (user, assistant):
                if not isinstance(messages[turn]["content"], str):
                    raise DataError(source, row, f"messages[{turn}].content", "is not a string")
            where.append((user, assistant))
        inputs = [rows[k][u]["content"] for k, (u, _) in enumerate(where)]
        outputs = [rows[k][a]["content"] for k, (_, a) in enumerate(where)]
        new_in, new_out = preview_texts(inputs, outputs, mode, m, P, connector, tokenizer)
        for messages, (u, a), text_in, text_out in zip(rows, where, new_in, new_out, strict=True):
            messages[u]["content"] = text_in
            messages[a]["content"] = text_out
        chunks.append(pa.array(rows, type=messages_type))
    index = table.schema.get_field_index("messages")
    new_column = pa.chunked_array(chunks, type=messages_type)
    out = table.set_column(index, table.schema.field("messages"), new_column)
    ids = table.column("id").to_pylist()
    n = len(ids)
    decisions = decisions_table(ids, [True] * n, [_reason(mode, m)] * n, [None] * n)
    return out, decisions


# ---------------------------------------------------------------- JSON / JSONL records, as the reference


def _read_json(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except Exception as e:
        raise PreviewError("RuntimeError", f"Failed to read JSON file '{path}': {e}") from e


def _read_jsonl(path: str, batch_size: int) -> Iterator[list]:
    """Batches of parsed JSONL items, blank lines skipped; errors worded as the reference's read_jsonl.

    The file is opened now, so a missing file is reported before the tokenizer is loaded, as there.
    """
    def fail(e: Exception) -> PreviewError:
        return PreviewError("RuntimeError", f"Failed to read JSONL file '{path}': {e}")

    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed by the generator
    except Exception as e:
        raise fail(e) from e
    scan = json.JSONDecoder().scan_once  # what json.loads runs once leading whitespace is skipped
    loads = json.loads

    def batches() -> Iterator[list]:
        number = 0
        with f:
            try:
                while True:
                    # Text-mode lines as the reference reads them, so line numbers and decode errors match.
                    lines = list(itertools.islice(f, batch_size))
                    if not lines:
                        return
                    batch = []
                    for line in lines:
                        number += 1
                        if not line.strip():
                            continue
                        # A line that is one value followed by its newline parses as json.loads would parse
                        # it; anything else goes through json.loads itself for its exact result or error.
                        try:
                            item, end = scan(line, 0)
                            if end != len(line) and (end != len(line) - 1 or line[end] != "\n"):
                                raise ValueError
                        except (StopIteration, ValueError):
                            try:
                                item = loads(line)
                            except json.JSONDecodeError as e:
                                raise fail(ValueError(f"JSON decode error at line {number}: {e}")) from e
                        batch.append(item)
                    if batch:
                        yield batch
            except PreviewError:
                raise
            except Exception as e:
                raise fail(e) from e

    return batches()


def _drain(batches: Iterator) -> None:
    """Read the rest of the input: the reference reads everything first, so a read error there wins."""
    for _ in batches:
        pass


def _rebatch(it: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(it, size)):
        yield batch


def _gather(batch: list, first: int, input_field: str, output_field: str,
            path: str = "<input>") -> tuple[list[str], list[str]]:
    """The two fields of every item, checked in item order as the reference checks them. Errors keep the
    reference's wording with the input file's name in front of it."""
    inputs, outputs = [], []
    for index, item in enumerate(batch, first):
        # `in` on whatever the item is, as the reference does (a list or string item gets the same message).
        if input_field not in item:
            raise PreviewError("ValueError", f"{path}: Item {index} is missing the input_field '{input_field}'.")
        if output_field not in item:
            raise PreviewError("ValueError", f"{path}: Item {index} is missing the output_field '{output_field}'.")
        if type(item) is not dict:
            raise PreviewError("TypeError", f"{path}: Item {index} is a {type(item).__name__}, not a JSON object.")
        text_in, text_out = item[input_field], item[output_field]
        for field, value in ((input_field, text_in), (output_field, text_out)):
            if type(value) is not str:
                kind = type(value).__name__
                raise PreviewError("TypeError", f"{path}: Item {index}: field '{field}' is a {kind}, not a string.")
        inputs.append(text_in)
        outputs.append(text_out)
    return inputs, outputs


def _apply(batch: list[dict], inputs: list[str], outputs: list[str], args, tokenizer) -> None:
    fi, fo, connector = args.input_field, args.output_field, args.options.connector
    if args.options.mode == "real":
        previews = answer_previews(outputs, tokenizer, args.options.m)
        for item, text, head in zip(batch, inputs, previews, strict=True):
            item[fi] = text + connector + head
        return
    P = args.options.P
    for item, text in zip(batch, inputs, strict=True):
        item[fi] = text + connector + P
        # Read back rather than reuse `outputs`: when both fields are the same one, the reference prepends
        # P to the already extended value.
        item[fo] = P + item[fo]


def _ascii_dumps():
    """json.dumps with its defaults, minus the encoder it builds per call (the same C encoder, same bytes)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - Python without the _json accelerator
        return json.dumps
    default = json.JSONEncoder()
    # No markers: items parsed from JSON cannot hold cycles.
    encode = make(None, default.default, json.encoder.encode_basestring_ascii, None, default.key_separator,
                  default.item_separator, False, False, True)
    join = "".join
    return lambda item: join(encode(item, 0))


class _Writer:
    """Writes items as the reference's write_json (indent 4, non-ASCII kept) or write_jsonl, incrementally."""

    def __init__(self, f, fmt: str, path: str):
        self.f, self.fmt, self.path, self.count = f, fmt, path, 0
        self.dumps = _ascii_dumps()

    def write(self, batch: list) -> None:
        try:
            if self.fmt == "jsonl":
                dumps = self.dumps
                self.f.write("\n".join([dumps(item) for item in batch]) + "\n")
            else:
                # An item nested one level in json.dump(indent=4) is its own dump with every line indented;
                # JSON strings never hold a raw newline, so each "\n" is a layout newline.
                parts = [json.dumps(item, ensure_ascii=False, indent=4).replace("\n", "\n    ")
                         for item in batch]
                lead = ",\n    " if self.count else "[\n    "
                self.f.write(lead + ",\n    ".join(parts))
            self.count += len(batch)
        except Exception as e:
            raise PreviewError("RuntimeError", f"Failed to write output file '{self.path}': {e}") from e

    def close(self) -> None:
        if self.fmt == "json":
            self.f.write("\n]" if self.count else "[]")


def load_tokenizer(path):
    """The tokenizer AutoTokenizer would give. A folder whose tokenizer_config.json names TokenizersBackend is
    loaded with that class directly: AutoTokenizer also reads the model config, which imports torch and costs
    several seconds of start-up for the same object."""
    try:
        cfg = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        cfg = {}
    try:
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            return TokenizersBackend.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise PreviewError("RuntimeError", f"Failed to load tokenizer from '{path}': {e}") from e


def run_records(args) -> int:
    """The reference tool's job on JSON/JSONL, streamed in batches; returns the number of items."""
    if args.input_format == "jsonl":
        batches: Iterator[list] = _read_jsonl(args.input_file, args.batch_size)
    else:
        data = _read_json(args.input_file)
    tokenizer = None
    if args.options.mode == "real":
        try:
            tokenizer = load_tokenizer(args.tokenizer_path)
        except PreviewError:
            if args.input_format == "jsonl":
                _drain(batches)
            raise
    if args.input_format == "json":
        try:
            items = iter(data)  # a top-level object iterates its keys, as there
        except TypeError as e:
            raise PreviewError("TypeError", str(e)) from e
        batches = _rebatch(items, args.batch_size)

    count = 0
    with atomic_file(args.output_file) as tmp, open(tmp, "w", encoding="utf-8") as f:
        writer = _Writer(f, args.output_format, args.output_file)
        for batch in batches:
            try:
                inputs, outputs = _gather(batch, count + 1, args.input_field, args.output_field,
                                          args.input_file)
            except PreviewError:
                _drain(batches)
                raise
            _apply(batch, inputs, outputs, args, tokenizer)
            first, count = count, count + len(batch)
            for index in range(first + PROGRESS_EVERY - first % PROGRESS_EVERY, count + 1, PROGRESS_EVERY):
                print(f"Processed {index} items...")
            writer.write(batch)
        writer.close()
    fmt = args.output_format.upper()
    print(f"Processing complete. Output saved to '{args.output_file}' in {fmt} format.")
    return count


def run_parquet(args) -> int:
    table = read_table(args.input_file)
    tokenizer = None
    if args.options.mode == "real":
        tokenizer = load_tokenizer(args.tokenizer_path)
    opts = args.options
    out, decisions = preview_table(table, tokenizer, opts.mode, opts.m, opts.P, opts.connector,
                                   source=args.input_file, batch_size=args.batch_size)
    if out.num_rows != table.num_rows:  # pragma: no cover - a preview never adds or drops records
        raise AssertionError("row count changed")
    write_table(out, args.output_file)
    if args.decisions_file:
        write_table(decisions, args.decisions_file)
    print(f"Previewed {out.num_rows} records ({_reason(opts.mode, opts.m)}) -> {args.output_file}")
    return out.num_rows


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LookAhead Tuning: partial answer preview of training data")
    p.add_argument("--input_file", type=str, required=True, help="records to preview")
    p.add_argument("--output_file", type=str, required=True, help="where the previewed records go")
    fmts = ["json", "jsonl", "parquet"]
    p.add_argument("--input_format", type=str, choices=fmts, required=True,
                   help="json, jsonl, or parquet (a canonical table; then the output is parquet too)")
    p.add_argument("--output_format", type=str, choices=fmts, required=True, help="json, jsonl or parquet")
    p.add_argument("--input_field", type=str, default="input", help="prompt field of a JSON item")
    p.add_argument("--output_field", type=str, default="output", help="answer field of a JSON item")
    # The method's options: defaults from PreviewOptions (hence SUPPRESS), given here or in --options.
    p.add_argument("--mode", type=str, choices=["real", "virtual"], default=argparse.SUPPRESS,
                   help="real: preview the answer's first m tokens; virtual: preview the phrase P")
    p.add_argument("--tokenizer_path", type=str, help="tokenizer folder (real mode)")
    p.add_argument("--m", type=int, default=argparse.SUPPRESS,
                   help=f"answer tokens to preview (real mode; default {PreviewOptions.m})")
    p.add_argument("--P", type=str, default=argparse.SUPPRESS,
                   help=f"phrase previewed and prepended (virtual mode; default {PreviewOptions.P!r})")
    p.add_argument("--connector", type=str, default=argparse.SUPPRESS,
                   help=f"text between prompt and preview (default {PreviewOptions.connector!r})")
    p.add_argument("--options", dest="options_json", type=str,
                   help="a preview step's options as one JSON object (mode, m, P, connector); flags win over it")
    p.add_argument("--decisions_file", type=str, help="Parquet decisions table (parquet format only)")
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE, help=argparse.SUPPRESS)
    args = p.parse_args(None if argv is None else list(argv))
    flags = {k: v for k, v in vars(args).items() if k in ("mode", "m", "P", "connector")}
    if "mode" not in flags and args.options_json is None:
        p.error("the following arguments are required: --mode")  # as the reference, unless --options is given
    try:
        args.options = options_from_cli(PreviewOptions, "preview", args.options_json, flags)
    except ValueError as e:
        p.error(str(e))
    parquet = {args.input_format, args.output_format} & {"parquet"}
    if parquet and args.input_format != args.output_format:
        p.error("parquet input needs parquet output and the other way round")
    if args.decisions_file and not parquet:
        p.error("--decisions_file needs --input_format parquet")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    return args


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.input_format == "parquet":
            run_parquet(args)
        else:
            run_records(args)
    except PreviewError as e:
        sys.stdout.flush()
        print(f"{e.kind}: {e}", file=sys.stderr)
        return 1
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

