import subprocess
import sys

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
    assert "mean loops 3.00 of 3" in run.stdout


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
    assert "mean loops 4.00 of 4" in out
    assert "drafts from loop 2 (pipelined):" in out and "% of tested drafts accepted" in out
