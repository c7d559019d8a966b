"""Chat-formatted calibration and the generation check, over a tiny model whose tokenizer has a chat template."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rankwise.configs
from rankwise.calib.chat import DEFAULT_CONVERSATIONS, chat_tokens, load_conversations, mixed_calibration_set
from rankwise.calib.data import calibration_set, tokenize
from rankwise.calib.sentences import sentences
from rankwise.compress.metadata import read_result
from rankwise.errors import RankwiseError
from rankwise.eval.evaluate import evaluate_model
from rankwise.eval.generation import DEFAULT_PROMPTS, GenerationCheck, load_prompts
from tiny import AUSTEN, austen_text, save_tiny, tiny_tokenizer

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def chat_tokenizer():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = TEMPLATE
    return tok


def windows_with(ids: torch.Tensor, token: int) -> int:
    return int((ids == token).any(dim=1).sum())


def windows_inside(ids: torch.Tensor, stream: torch.Tensor) -> int:
    """How many of the windows are a stretch of `stream`."""
    stretches = stream.unfold(0, ids.shape[1], 1)
    return sum(bool((stretches == w).all(dim=1).any()) for w in ids)


def test_a_chat_template_mixes_a_quarter_of_chat_windows_by_default():
    tok, text = chat_tokenizer(), austen_text(40_000)
    mixed = mixed_calibration_set(tok, "austen", 12, 48, seed=0, text=text)
    assert mixed.chat_windows == 3 and mixed.chat == str(DEFAULT_CONVERSATIONS)
    assert mixed.input_ids.shape == (12, 48)
    chat = chat_tokens(tok, load_conversations(DEFAULT_CONVERSATIONS))
    assert windows_inside(mixed.input_ids, chat) == 3  # rendered through the template
    assert tok.eos_token_id in chat.tolist() and tok.eos_token_id not in tokenize(tok, text).tolist()
    again = mixed_calibration_set(tok, "austen", 12, 48, seed=0, text=text)
    assert torch.equal(mixed.input_ids, again.input_ids)
    none = mixed_calibration_set(tok, "austen", 12, 48, seed=0, text=text, chat_fraction=0.0)
    assert none.chat_windows == 0 and windows_inside(none.input_ids, chat) == 0


def test_without_a_chat_template_calibration_is_plain_text_as_before():
    tok, text = tiny_tokenizer(), austen_text(40_000)
    mixed = mixed_calibration_set(tok, "austen", 8, 48, seed=2, text=text)
    plain = calibration_set(tok, "austen", 8, 48, seed=2, text=text)
    assert mixed.chat_windows == 0 and torch.equal(mixed.input_ids, plain.input_ids)
    with pytest.raises(RankwiseError, match="chat template"):
        mixed_calibration_set(tok, "austen", 8, 48, seed=2, text=text, chat_fraction=0.5)


def test_a_conversations_file_of_ones_own_and_a_bad_one(tmp_path):
    good = tmp_path / "chat.jsonl"
    good.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "Who is Emma?"},
                                                      {"role": "assistant", "content": "A heroine."}]})
                              for _ in range(40)) + "\n")
    tok = chat_tokenizer()
    mixed = mixed_calibration_set(tok, "austen", 8, 48, text=austen_text(40_000), chat=str(good), chat_fraction=0.5)
    assert mixed.chat == str(good) and mixed.chat_windows == 4
    assert windows_with(mixed.input_ids, tok.eos_token_id) == 4  # turns are short: every chat window ends one
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "no messages"}\n')
    with pytest.raises(RankwiseError, match=r"bad.jsonl:2: expected"):
        load_conversations(bad)


def test_the_shipped_files_hold_what_they_say():
    conversations = load_conversations(DEFAULT_CONVERSATIONS)
    assert len(conversations) >= 200
    assert all(m[0]["role"] == "user" and m[-1]["role"] == "assistant" for m in conversations)
    assert len(load_prompts(DEFAULT_PROMPTS)) >= 16
    assert "What is the capital of France?" in load_prompts()
    assert AUSTEN.exists()


@pytest.mark.parametrize("script, shipped", [("chat/make_austen_chat.py", "chat/austen_chat.jsonl"),
                                              ("tasks/make_austen_mc.py", "tasks/austen_mc.jsonl")])
def test_the_shipped_austen_files_are_what_their_scripts_make(script, shipped, tmp_path):
    """Run by path, as their docstrings say, the scripts rebuild the shipped files byte for byte."""
    configs = Path(rankwise.configs.__file__).parent
    out = tmp_path / "out.jsonl"
    subprocess.run([sys.executable, str(configs / script), "--source", str(AUSTEN), "--out", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    assert out.read_bytes() == (configs / shipped).read_bytes()


def test_sentences_keep_titles_with_their_names():
    assert sentences('Mr. Knightley came in. "Is it so?" said Emma. Mrs. Weston smiled!') == [
        "Mr. Knightley came in.", '"Is it so?" said Emma.', "Mrs. Weston smiled!"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = save_tiny(tmp_path_factory.mktemp("chat") / "dense")
    chat_tokenizer().save_pretrained(path)
    return path


def test_compress_records_its_chat_windows_and_evaluate_checks_generation(chat_model, tmp_path, cli):
    austen = tmp_path / "austen.txt"
    austen.write_text(austen_text(40_000))
    out = tmp_path / "c"
    r = cli("model", str(chat_model), "-o", out, "--ratio", "0.5", "--calib", f"text:{austen}", "--nsamples", "8",
            "--seqlen", "48", "--chat-fraction", "0.5", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    calibration = read_result(out).calibration
    assert calibration.chat_windows == 4 and calibration.chat == str(DEFAULT_CONVERSATIONS)
    result_json = tmp_path / "gen.json"
    r = cli("evaluate", str(out), "--generation-check", "--device", "cpu",  # reference: the source model
            "--json", result_json, "--quiet")
    assert r.exit_code == 0, r.output
    check = GenerationCheck.model_validate(json.loads(result_json.read_text())["generation"])
    assert check.chat_template and check.reference_model == str(chat_model) and len(check.answers) == 20
    assert check.exact_match == sum(a.exact for a in check.answers) / 20
    assert check.first_token_agreement == sum(a.first_token for a in check.answers) / 20
    assert check.first_token_agreement >= check.exact_match
    assert all(a.first_token or not a.exact for a in check.answers)


def test_the_dense_model_agrees_with_itself(chat_model):
    result = evaluate_model(str(chat_model), generation=True, device="cpu", max_new_tokens=8)
    check = result.generation
    assert isinstance(check, GenerationCheck) and result.settings.generation
    assert check.reference_model == str(chat_model)
    assert check.exact_match == 1.0 and check.first_token_agreement == 1.0
    assert all(a.answer == a.reference for a in check.answers)
