import re
import subprocess
import sys

import pytest
import torch

from looplm.__main__ import main
from looplm.checkpoint import save_pretrained

from .conftest import tiny_model


def test_cli_prints_text_and_loops_per_token(tmp_path, capsys):
    model = tiny_model(loops=3)
    save_pretrained(model, tmp_path)
    # a checkpoint without tokenizer.json cannot take a text prompt: clear error, exit code 2
    assert main(["generate", "hello", "--model", str(tmp_path)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_cli_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["one two three four five six"] * 10, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"]))
    tok.save(str(tmp_path / "tok.json"))
    save_pretrained(tiny_model(vocab=tok.get_vocab_size(), loops=3), tmp_path / "m", tokenizer_json_path=tmp_path / "tok.json")
    run = subprocess.run(
        [sys.executable, "-m", "looplm", "generate", "one two", "--model", str(tmp_path / "m"), "--max-new-tokens", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) >= 1 and all(r[1] == "3" for r in rows)  # every token used all 3 loops
    assert "mean exit loop 3.00 of 3, loops computed per token 3.00" in run.stdout


def test_cli_speculative_reports_draft_acceptance(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["one two three four five six"] * 10, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"]))
    tok.save(str(tmp_path / "tok.json"))
    save_pretrained(tiny_model(vocab=tok.get_vocab_size(), loops=4), tmp_path / "m", tokenizer_json_path=tmp_path / "tok.json")
    assert main(["generate", "one two", "--model", str(tmp_path / "m"), "--max-new-tokens", "8", "--mode", "speculative",
                 "-o", "draft_loop=2"]) == 0
    out = capsys.readouterr().out
    assert "mean exit loop 4.00 of 4" in out
    assert "drafts from loop 2 (pipelined):" in out and "% of tested drafts accepted" in out
    assert main(["generate", "one two", "--model", str(tmp_path / "m"), "--max-new-tokens", "8", "--mode", "speculative",
                 "-o", "draft_loop=adaptive", "-o", "call_cost=1.5"]) == 0
    assert "drafts from loops 2 (adaptive, call cost 1.5):" in capsys.readouterr().out  # 8 tokens: too few to switch


# -- user errors: one `error:` line, exit status 2, no traceback (issue #13 item 4) ---------------
USER_ERRORS = [
    (["-o", "foo=1"], "unknown option 'foo' for mode 'full'"),
    (["-o", "draft_loop=2"], "unknown option 'draft_loop' for mode 'full'; it is an option of mode 'speculative'"),
    (["--mode", "anytime", "-o", "draft_len=3"], "unknown option 'draft_len' for mode 'anytime'; it is an option of mode 'speculative'"),
    (["--mode", "speculative", "-o", "exit=q_exit"], "unknown option 'exit' for mode 'speculative'; it is an option of mode 'anytime'"),
    (["-o", "noequals"], "expected key=value, got 'noequals'"),
    (["-o", "temperature=1"], "temperature has its own flag: use --temperature"),
    (["--max-new-tokens", "abc"], "expected an integer >= 1, got 'abc'"),
    (["--max-new-tokens", "0"], "expected an integer >= 1, got 0"),
    (["--threads", "0"], "expected an integer >= 1, got 0"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0, got inf"),
    (["--temperature", "warm"], "invalid float value: 'warm'"),
    (["--top-p", "2"], r"top_p must be a finite number in \(0, 1\], got 2.0"),
    (["--top-k", "0"], "top_k must be an integer >= 1, got 0"),
    (["--mode", "warp"], "invalid choice: 'warp'"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--model", "/nonexistent/ckpt"], "checkpoint directory /nonexistent/ckpt does not exist"),
    (["--mode", "speculative", "-o", "draft_loop=9"], "draft_loop"),
    (["--mode", "anytime", "-o", "exit=confidence", "-o", "threshold=2"], r"confidence threshold must be a finite number in \[0, 1\]"),
    (["--mode", "anytime", "-o", "exit=nope"], "unknown exit policy 'nope'"),
]


def _single_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


@pytest.mark.parametrize("args, message", USER_ERRORS)
def test_generate_user_errors_are_one_line(args, message, capsys):
    assert main(["generate", "def f(x):", "--max-new-tokens", "3", *args]) == 2
    assert re.search(message, _single_error_line(capsys))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_cuda_device_without_cuda(capsys):
    assert main(["generate", "def f(x):", "--device", "cuda"]) == 2
    assert "CUDA is not available" in _single_error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: command"),
    (["generate"], "the following arguments are required: prompt"),
    (["speak"], "invalid choice: 'speak'"),
    (["demo", "--concurrency", "0"], "--concurrency must be >= 1, got 0"),
    (["demo", "--port", "99999"], "--port must lie in 1..65535, got 99999"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--device", "tpu9"], "device='tpu9' is not a torch device"),
])
def test_other_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in _single_error_line(capsys)


def test_help_shows_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("new tokens (default: 48)", "0 is greedy (default: 0.0)", "decoder (default: full)",
                    "default: the bundled model", "chosen from the model's size"):
        assert default in text, default


def test_demo_help_shows_the_demo_options(capsys):
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m demo")
    assert "--port PORT" in text and "(default: 4)" in text and "--concurrency" in text


@pytest.mark.parametrize("warmup", [True, False])
def test_tokens_per_s_says_whether_it_includes_the_warm_up(warmup, capsys):
    assert main(["generate", "def f(x):", "--max-new-tokens", "4", "--mode", "speculative"] + ([] if warmup else ["--no-warmup"])) == 0
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if " tok/s " in line)
    expect = "after a warm-up call" if warmup else "includes the first call's warm-up"
    assert f"tok/s ({expect}; 1 torch thread)" in summary
