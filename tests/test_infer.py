"""infer.py's command line: bad arguments end in one clear line."""
import pytest

import infer


def infer_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        infer.main(list(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "-1"], "argument --top-k: -1: must be at least 0"),
    (["--temperature", "-1"], "argument --temperature: -1: must be at least 0.0"),
    (["--temperature", "nan"], "argument --temperature: nan: must be at least 0.0"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens: -3: must be at least 0"),
])
def test_bad_sampling_arguments_are_refused(capsys, tmp_path, argv, message):
    code, err = infer_error(capsys, "--checkpoint", str(tmp_path), *argv)
    assert code == 2 and message in err


def test_a_missing_checkpoint_and_a_non_utf8_prompt_file_are_named(capsys, tmp_path):
    code, _ = infer_error(capsys, "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi")
    assert code == f"error: {tmp_path / 'nope'}: no such checkpoint directory"
    (tmp_path / "p.txt").write_bytes("café".encode("latin-1"))
    code, _ = infer_error(capsys, "--checkpoint", str(tmp_path / "nope"), "--prompt-file", str(tmp_path / "p.txt"))
    assert code.startswith(f"error: {tmp_path / 'p.txt'}: not UTF-8 text")
