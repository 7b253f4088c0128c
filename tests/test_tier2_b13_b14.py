"""B13 SFT, B14 DPO: run as a user runs them, and their claims checked (B7: tests/test_tier2_b07.py).

Each milestone runs through `tierkit run B<n> --size char-0.1M` on a reference kit (no
probe, no profile touched). With no B12 checkpoint in the fresh home, the base is the
stand-in char model b12_pretrain.base_model trains in seconds. The functions are then tested
directly: the SFT mask (exactly the prompt
and the template's headers), LoRA (only its parameters train), the DPO loss on a hand-made
example and the sign of its gradient. Bad input gets one line and no build folder.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import SHARED, assert_one_line_error, run_cli
from tests.test_runner import assert_png

torch = pytest.importorskip("torch", reason="tier-2 milestones need torch (pip install 'tierkit[tier2]')")

from tiers.tier2 import b13_sft as b13
from tiers.tier2 import b14_dpo as b14
from tiers.tier2 import sft_data

DATA = SHARED / "data"
HH = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
HAS_DATA = (DATA / "tinyshakespeare.txt").is_file() and HH.is_file()
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"Tiny Shakespeare and hh-rlhf are not under {DATA}")
KIT, SIZE = "laptop-8gb-cpu", "char-0.1M"
ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TIERKIT_DATA": str(DATA)}


def run_milestone(mid: str, home: Path, **env: str) -> tuple[Path, dict]:
    proc = run_cli("run", mid, "--size", SIZE, "--profile", KIT, home=home, env={**ENV, **env}, timeout=240)
    assert proc.returncode == 0, proc.stderr
    folder = next((home / "builds").glob(f"B{int(mid[1:]):02d}-*"))
    for png in folder.glob("*.png"):
        assert_png(png)
    assert "## Predicted vs actual" in (folder / "README.md").read_text()
    return folder, json.loads((folder / "metrics.json").read_text())["metrics"]


# ---------------------------------------------------------------- B13

def char_base():
    from models.tokenizers import CharTokenizer

    return CharTokenizer("\n !',-.?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def test_parse_hh_dialogue_into_turns():
    text = "\n\nHuman: Hi there?\n\nAssistant: Hello.\n\nHuman: And?\n\nAssistant:  Bye!"
    turns = sft_data.parse_dialogue(text)
    assert turns == [("Human", "Hi there?"), ("Assistant", "Hello."), ("Human", "And?"), ("Assistant", "Bye!")]
    assert sft_data.exchanges(turns) == [("Hi there?", "Hello."), ("And?", "Bye!")]


@needs_data
def test_hh_rlhf_pairs_from_the_real_file():
    rows = sft_data.read_jsonl(HH)
    pairs = sft_data.hh_pairs(rows)
    assert len(rows) == 2312 and len(pairs) > 2200
    assert all(p and r and "Human:" not in p for p, r in pairs[:200])
    triples = b14.preference_pairs(rows)
    assert len(triples) > 2000 and all(w != l for _, w, l in triples)


def test_mask_covers_exactly_the_prompt_and_headers():
    tok = b13.ChatTokenizer(char_base(), extra_chars="0123456789")
    prompt, response = "What is 2 plus 2?", "It is 4."
    ids, n_prompt, complete = b13.render(tok, prompt, response)
    assert complete and ids[0] == tok.user and ids[n_prompt - 2] == tok.assistant and ids[-1] == tok.end
    assert tok.decode(ids) == f"<|user|>\n{prompt}\n<|assistant|>\n{response}<|end|>"
    x, y = b13.masked_example(ids, n_prompt)
    assert x == ids[:-1] and len(y) == len(ids) - 1
    masked = [j for j, t in enumerate(y) if t == -1]
    # every target that is a prompt token (header, prompt, "\n<|assistant|>\n") is masked, and nothing else
    assert masked == list(range(n_prompt - 1))
    assert [t for t in y if t != -1] == ids[n_prompt:]
    assert tok.decode([t for t in y if t != -1]) == response + "<|end|>"


def test_chat_tokenizer_unknown_characters_and_markers():
    base = char_base()
    extra, replaced = b13.plan_chars(base, ["a 1 1 1 “q” ✓"], min_count=3)
    assert extra == "1" and replaced == {'"': 2, "✓": 1}   # “ ” normalise to '"', which the base lacks
    tok = b13.ChatTokenizer(base, extra)
    assert tok.vocab_size == base.vocab_size + 1 + 3
    ids = tok.encode("<|end|> 1 ✓")
    assert tok.end not in ids                              # typed markers are characters, never the token
    assert tok.decode(ids) == "??end?? 1 ?" and tok.replaced == 5
    assert b13.ChatTokenizer.from_meta(base, tok.to_meta()).vocab_size == tok.vocab_size


def test_long_pairs_are_cut_to_the_context():
    tok = b13.ChatTokenizer(char_base())
    ids, n_prompt, complete = b13.render(tok, "x" * 500, "y" * 500, max_tokens=65)
    assert len(ids) == 65 and not complete and tok.end not in ids and n_prompt <= 33
    ids, n_prompt, complete = b13.render(tok, "x" * 500, "short", max_tokens=65)
    assert len(ids) == 65 and complete and ids[-1] == tok.end   # a short reply leaves the prompt more room


def test_lora_trains_only_lora_parameters():
    from models.gpt import GPT, GPTConfig
    from tiers.tier2 import b12_pretrain as b12
    from tiers.tier2 import common

    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16), seed=0)
    model = b13.grow_vocab(base, 23)
    grown = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = b13.add_lora(model, r=4, alpha=8, train_rows_from=20)
    assert all("lora_" in n for n in trainable if n != "transformer.wte.weight")
    assert len([n for n in trainable if "lora_" in n]) == 2 * 2 * 4   # A, B x 4 Linears x 2 layers
    x = torch.randint(0, 23, (4, 16))
    batch = (x, torch.roll(x, -1, 1))
    tc = common.TrainConfig(steps=20, lr=1e-2, warmup=0, weight_decay=0.0, eval_interval=0, seed=0)
    b12.train(model, tc, lambda g: batch, device=torch.device("cpu"), log=lambda *a: None)
    state = model.state_dict()
    for k, v in grown.items():
        key = k if k in state else k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        if k in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(state[key][:20], v[:20]) and not torch.equal(state[key][20:], v[20:])
        else:
            assert torch.equal(state[key], v), k                                  # frozen, bit for bit
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        out_lora = model(x, batch[1])[1]
        out_merged = b13.merge_lora(model)(x, batch[1])[1]
    assert float(out_lora) == pytest.approx(float(out_merged), rel=1e-5)


def test_user_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(b13.SFTError, match=r"bad.jsonl:2: not JSON"):
        sft_data.user_pairs(bad)
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(b13.SFTError, match="lacks a string 'prompt' and a non-empty string 'response'"):
        sft_data.user_pairs(bad)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(3)))
    assert sft_data.user_pairs(good)[2] == ("q2", "a2")


def test_b13_cli_bad_data_file_is_one_line(home, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "hi", "response": "hello"}\n[1, 2]\n')
    proc = run_cli("run", "B13", "--size", SIZE, "--profile", KIT, home=home,
                   env={**ENV, "TIERKIT_B13_DATA": str(bad)})
    assert_one_line_error(proc, "pairs.jsonl:2", "JSON object")
    assert not list((home / "builds").glob("B13-*"))
    proc = run_cli("run", "B13", "--size", SIZE, "--profile", KIT, home=home,
                   env={**ENV, "TIERKIT_B13_DATA": str(tmp_path / "nope.jsonl")})
    assert_one_line_error(proc, "nope.jsonl: no such file", "TIERKIT_B13_DATA")


@needs_data
def test_b13_then_b14_cli(home):
    """SFT lowers the held-out response loss; DPO from that SFT model raises the held-out margin."""
    folder, m = run_milestone("B13", home)
    assert (folder / "sft.pt").is_file() and (folder / "sft_loss.png").is_file()
    assert m["held_out_loss_sft"] < m["held_out_loss_base"] - 0.1
    assert m["vocab"]["total"] == m["vocab"]["base"] + len(m["vocab"]["added_chars"]) + 3
    readme = (folder / "README.md").read_text()
    assert "<|user|>" in readme and "Base vs SFT on held-out prompts" in readme

    folder, m = run_milestone("B14", home)
    assert m["reference"].startswith("B13 SFT model")
    assert [b["beta"] for b in m["betas"]] == [0.05, 0.1, 0.5]
    for b in m["betas"]:
        assert b["after"]["margin"] > m["before"]["margin"], b     # held-out pairs, never trained on
    assert (folder / "dpo.png").is_file()


# ---------------------------------------------------------------- B14

def test_dpo_loss_equals_the_formula_and_its_gradient_points_the_right_way():
    pi_w = torch.tensor([-10.0, -5.0], requires_grad=True)
    pi_l = torch.tensor([-12.0, -4.0], requires_grad=True)
    ref_w, ref_l, beta = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0]), 0.1
    loss, z = b14.dpo_loss(pi_w, pi_l, ref_w, ref_l, beta)
    # by hand: z1 = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2;  z2 = 0.1 * ((-5 + 5) - (-4 + 5)) = -0.1
    assert z.tolist() == pytest.approx([0.2, -0.1])
    expect = (-math.log(1 / (1 + math.exp(-0.2))) - math.log(1 / (1 + math.exp(0.1)))) / 2
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-6)
    loss.backward()
    # descending the loss raises the chosen log-prob and lowers the rejected one, by beta * sigmoid(-z) / n
    sig = [1 / (1 + math.exp(0.2)), 1 / (1 + math.exp(-0.1))]
    assert pi_w.grad.tolist() == pytest.approx([-beta * s / 2 for s in sig], rel=1e-5)
    assert pi_l.grad.tolist() == pytest.approx([beta * s / 2 for s in sig], rel=1e-5)
    # policy == reference: the loss is log 2 whatever beta
    assert float(b14.dpo_loss(ref_w, ref_l, ref_w, ref_l, 0.5)[0]) == pytest.approx(math.log(2))


def test_sequence_logprobs_sum_response_tokens_only():
    from models.gpt import GPT, GPTConfig

    tok = b13.ChatTokenizer(char_base())
    model = b13.grow_vocab(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                                         n_embd=16), seed=1), tok.vocab_size).eval()
    ex = b13.encode_pairs(tok, [("hi", "yes"), ("hello there", "no")], 32)
    X, Y = b13.collate(ex)
    with torch.no_grad():
        got = b14.sequence_logprobs(model, X, Y)
        for i, (x, y) in enumerate(ex):
            logits, _ = model(torch.tensor([x]), torch.tensor([y]))
            logp = torch.log_softmax(logits[0], -1)
            want = sum(float(logp[j, t]) for j, t in enumerate(y) if t != -1)
            assert float(got[i]) == pytest.approx(want, rel=1e-5)
            assert sum(t != -1 for t in y) == len(("yes", "no")[i]) + 1       # the reply and <|end|>
