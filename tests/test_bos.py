"""Calibration runs the model as it runs in use: BOS first when the tokenizer adds it."""
import copy

import pytest
from tokenizers.processors import TemplateProcessing

from rankwise.calib.data import calibration_set, tokenizer_adds_bos
from rankwise.errors import RankwiseError
from tiny import austen_text, save_tiny, tiny_tokenizer


def bos_tokenizer():
    """The tiny tokenizer with a post-processor that starts every text with <s> (as Llama 3 / Gemma do)."""
    tok = copy.deepcopy(tiny_tokenizer())
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                              special_tokens=[("<s>", bos)])
    return tok


def test_bos_tokenizer_calibration_windows_start_with_bos():
    tok = bos_tokenizer()
    assert tokenizer_adds_bos(tok)
    ids = calibration_set(tok, "austen", 4, 32, text=austen_text(20_000)).input_ids
    assert ids.shape == (4, 32)
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert (ids[:, 1:] != tok.bos_token_id).all()  # BOS only where the tokenizer puts it


def test_plain_tokenizer_calibration_windows_do_not_start_with_bos():
    tok = tiny_tokenizer()
    assert not tokenizer_adds_bos(tok)
    ids = calibration_set(tok, "austen", 4, 32, text=austen_text(20_000)).input_ids
    assert ids.shape == (4, 32)
    assert (ids[:, 0] != tok.bos_token_id).all()


def test_explicit_bos_overrides_the_tokenizer():
    text, bos = austen_text(20_000), tiny_tokenizer().bos_token_id
    assert (calibration_set(tiny_tokenizer(), "a", 2, 16, text=text, bos=True).input_ids[:, 0] == bos).all()
    assert (calibration_set(bos_tokenizer(), "a", 2, 16, text=text, bos=False).input_ids[:, 0] != bos).all()


def test_bos_recorded_in_metadata_and_followed_by_evaluate(tmp_path, austen_file, cli):
    from rankwise.compress.metadata import read_result
    from rankwise.eval.evaluate import evaluate_model
    src = save_tiny(tmp_path / "m")
    bos_tokenizer().save_pretrained(src)
    out = tmp_path / "c"
    r = cli("model", src, "-o", out, "--ratio", "0.3", "--calib", f"text:{austen_file}", "--nsamples", "2",
            "--seqlen", "32", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert read_result(str(out)).calibration.bos is True
    common = dict(seqlen=32, max_windows=2, device="cpu")
    assert evaluate_model(str(out), [f"text:{austen_file}"], **common).settings.bos is True
    assert evaluate_model(str(out), [f"text:{austen_file}"], bos=False, **common).settings.bos is False


def test_bos_asked_of_a_tokenizer_without_one_is_refused():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.bos_token = None
    with pytest.raises(RankwiseError, match="no BOS token"):
        calibration_set(tok, "a", 2, 16, text=austen_text(20_000), bos=True)
