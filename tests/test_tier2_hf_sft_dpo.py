"""B13 SFT and B14 DPO on Hugging Face causal LMs: tiny real checkpoints under the registry's names.

tests/hf_fixtures.py builds tiny Qwen2, Llama and GPT-2 models with transformers' own classes and a
byte-level BPE tokenizer (ChatML template for the chat models, none for GPT-2), and puts them in a
test hub cache as `qwen2.5-0.5b-instruct`, `smollm2-135m-instruct` and `gpt2`. The instruction data
is a small file in each registry format (alpaca-cleaned's JSON list, dolly-15k's JSONL) in the hub's
dataset layout; the preference pairs are the real hh-rlhf test split. Nothing is downloaded.

Checked: the loss mask, decoded, is exactly the response and the end-of-turn token; the held-out
response loss falls after SFT on a tiny Qwen2 and a tiny Llama; with LoRA only adapter weights get
gradients and change (the base is bit-identical after training); B14's held-out margin rises over
the SFT reference; LoRA DPO keeps one copy of the model (its reference is the adapter-disabled model),
full DPO a second (the frozen copy). Bad input is one line naming the fix.
"""
from __future__ import annotations

import contextlib
import gc
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import SHARED, run_cli

torch = pytest.importorskip("torch", reason="tier-2 milestones need torch (pip install 'tierkit[tier2]')")
pytest.importorskip("transformers", reason="B13/B14 on Hugging Face models need transformers")
pytest.importorskip("peft", reason="LoRA needs peft")

from tests import hf_fixtures as fx
from tiers import data
from tiers.runner import Context, RunError
from tiers.tier2 import b12_pretrain as b12
from tiers.tier2 import b13_sft as b13
from tiers.tier2 import b14_dpo as b14
from tiers.tier2 import common, hf, sft_data

DATA = SHARED / "data"
HH = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
needs_data = pytest.mark.skipif(not (DATA / "tinyshakespeare.txt").is_file() or not HH.is_file(),
                                reason=f"Tiny Shakespeare and hh-rlhf are not under {DATA}")
pytestmark = needs_data
QWEN, LLAMA, GPT2 = "qwen2.5-0.5b-instruct", "smollm2-135m-instruct", "gpt2"
ARCH = {QWEN: "qwen2", LLAMA: "llama", GPT2: "gpt2"}


def instruction_rows(n: int = 300) -> list[dict[str, str]]:
    """Shakespeare lines as instructions: continue the first half of a line."""
    lines = [s.strip() for s in fx.corpus(120_000).splitlines() if len(s.strip()) > 24]
    return [{"instruction": "Continue the line.", "input": s[:len(s) // 2], "output": s[len(s) // 2:]}
            for s in lines[:n]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub cache with the three tiny models and the two instruction sets, built once for this file."""
    root = tmp_path_factory.mktemp("hf")
    cache = root / "hub"
    chat_tok = fx.train_tokenizer()
    for name in (QWEN, LLAMA):
        fx.tiny_checkpoint(cache, data.get(name).repo_id, ARCH[name], tokenizer=chat_tok)
    fx.tiny_checkpoint(cache, data.get(GPT2).repo_id, "gpt2", tokenizer=fx.train_tokenizer(chat=False))
    rows = instruction_rows()
    for name, text in (("alpaca-cleaned", json.dumps(rows)),
                       ("dolly-15k", "\n".join(json.dumps({"instruction": r["instruction"], "context": r["input"],
                                                           "response": r["output"], "category": "open_qa"})
                                               for r in rows))):
        folder = root / name
        folder.mkdir()
        (folder / data.get(name).target).write_text(text)
        fx.put_in_cache(cache, data.get(name).repo_id, folder, kind="datasets")
    return cache


@pytest.fixture
def env(cache: Path, monkeypatch: pytest.MonkeyPatch):
    fx.hub_env(monkeypatch, cache)
    monkeypatch.setenv("TIERKIT_DATA", str(DATA))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny models: one thread is fastest, and the machine is shared
    yield cache
    torch.set_num_threads(threads)


def run(module, config, builds: Path, folder: str):
    """module.run(ctx) as the runner calls it: into a temporary folder, renamed to builds/<folder> on success."""
    builds.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.tmp-", dir=builds))
    ctx = Context(out_dir=tmp, device="cpu", config=config, plan=None, profile=None)
    try:
        out = module.run(ctx)
    except BaseException:
        shutil.rmtree(tmp)
        raise
    tmp.rename(builds / folder)
    return out, ctx


def sft_config(model: str, **kw) -> b13.Config:
    base = {"model": model, "dataset": "alpaca-cleaned", "steps": 30, "batch_size": 8, "lr": 1e-3, "warmup": 2,
            "block_size": 96, "eval_pairs": 40, "generations": 2, "gen_tokens": 8}
    return b13.Config(**(base | kw))


def dpo_config(model: str, **kw) -> b14.Config:
    base = {"model": "b13", "base": model, "pairs": 240, "seq": 128, "steps": 20, "batch_size": 8, "lr": 1e-3,
            "betas": [0.1], "generations": 1, "gen_tokens": 8}
    return b14.Config(**(base | kw))


# ---------------------------------------------------------------- the chat format and the mask

@pytest.mark.parametrize("name", [QWEN, LLAMA, GPT2])
def test_mask_covers_exactly_the_response_and_the_end_token(env, name):
    folder = data.require(name)
    tok = hf.load_tokenizer(folder)
    fmt = hf.ChatFormat(tok)
    prompt, response = "What is the name of the king?", "The king is called Richard."
    ids, n_prompt, complete = fmt.render(prompt, response)
    x, y = b13.masked_example(ids, n_prompt)
    assert complete and x == ids[:-1] and y[-1] == fmt.end_id
    assert [j for j, t in enumerate(y) if t == -1] == list(range(n_prompt - 1))   # every prompt target, no other
    assert fmt.decode([t for t in y if t != -1]) == response + fmt.end_text
    assert fmt.decode(ids[:n_prompt]) == fmt.prompt_text(prompt)                 # what generation starts from
    if name == GPT2:   # no chat template: the plain format, ended by GPT-2's end of text
        assert not fmt.template and fmt.end_text == "<|endoftext|>"
        assert fmt.decode(ids) == f"### Instruction:\n{prompt}\n\n### Response:\n{response}<|endoftext|>"
    else:              # the tokenizer's own template, the newline after <|im_end|> left out
        assert fmt.template and fmt.end_text == "<|im_end|>"
        whole = tok.apply_chat_template([{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": response}], tokenize=False)
        assert whole == fmt.decode(ids) + "\n"
    # cut to fit: the response loses its end (no lesson in stopping mid-sentence); too long a prompt is dropped
    cut = fmt.render(prompt, response * 20, max_tokens=2 * n_prompt + 1)
    assert cut is not None and len(cut[0]) == 2 * n_prompt + 1 and not cut[2] and fmt.end_id not in cut[0][n_prompt:]
    assert fmt.render(prompt * 30, response, max_tokens=2 * n_prompt) is None


@pytest.mark.parametrize("name", [QWEN, LLAMA, GPT2])
def test_output_layer_only_where_the_loss_looks_gives_the_same_logits(env, name):
    lm = hf.LM(hf.load_model(data.require(name), torch.device("cpu"))).eval()
    x = torch.randint(0, 500, (3, 17))
    where = torch.rand(3, 17) > 0.6
    with torch.no_grad():
        assert torch.allclose(lm.logits_at(x, where), lm.logits(x)[where], atol=1e-5)


def test_instruction_files_in_the_registry_formats(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add.", "input": "2 and 2", "output": "4"},
                                  {"instruction": "Greet.", "input": "", "output": "Hello!"},
                                  {"instruction": "", "input": "x", "output": "y"}]))
    rows = sft_data.read_records(alpaca)
    assert sft_data.instruction_pairs(rows, "input", "output") == [("Add.\n\n2 and 2", "4"), ("Greet.", "Hello!")]
    dolly = tmp_path / "d.jsonl"
    dolly.write_text(json.dumps({"instruction": "Who?", "context": "Ann met Bob.", "response": "Bob"}) + "\n")
    assert sft_data.instruction_pairs(sft_data.read_records(dolly), "context", "response") == \
        [("Who?\n\nAnn met Bob.", "Bob")]
    alpaca.write_text('[{"instruction": "a", "output": "b"}, 3]')
    with pytest.raises(sft_data.SFTError, match="item 1 of the list is not an object"):
        sft_data.read_records(alpaca)


# ---------------------------------------------------------------- B13

@pytest.mark.parametrize(("name", "dataset"), [(QWEN, "alpaca-cleaned"), (LLAMA, "dolly-15k")])
def test_sft_lowers_the_held_out_response_loss(env, tmp_path, name, dataset):
    out, ctx = run(b13, sft_config(name, dataset=dataset), tmp_path / "builds", b13.FOLDER)
    m = out.metrics
    assert m["held_out_loss_sft"] < m["held_out_loss_base"] - 0.2, m     # measured: 6.25 -> 5.76 (Qwen2)
    assert m["model"] == name and m["snapshot"] == str(data.require(name))
    assert m["trainable_params"] == m["params"] > 0 and m["lora"] is None
    assert m["data"].startswith(dataset) and m["template"] == "the tokenizer's chat template"
    saved = tmp_path / "builds" / b13.FOLDER / hf.SFT_DIR
    assert {"config.json", "model.safetensors", "tokenizer.json", hf.SFT_META} <= {p.name for p in saved.iterdir()}
    assert json.loads((saved / hf.SFT_META).read_text())["model"] == name
    assert "| prompt | base (before) | SFT (after) |" in out.report and "<|im_end|>" in out.report
    assert any(name in line and str(data.require(name)) in line for line in ctx.lines)   # the log names it


def test_lora_trains_only_the_adapters(env, tmp_path):
    folder = data.require(LLAMA)
    model, fmt = hf.load_model(folder, torch.device("cpu")), hf.ChatFormat(hf.load_tokenizer(folder))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model, names = hf.add_lora(model, r=4, alpha=8)
    assert names and all("lora_" in n for n in names)
    lm = hf.LM(model)
    train_ex = b13.encode_pairs(fmt, [(r["instruction"] + "\n\n" + r["input"], r["output"])
                                      for r in instruction_rows(64)], 96)
    tc = common.TrainConfig(steps=15, lr=1e-2, warmup=0, weight_decay=0.0, eval_interval=0, seed=0)
    b12.train(lm, tc, lambda g: b13.collate(train_ex[:16]), device=torch.device("cpu"), loss_fn=b13.sft_loss,
              log=lambda *a: None)
    # the last step's gradients are still there: only on the adapters
    assert {n for n, p in lm.named_parameters() if p.grad is not None} == \
        {f"model.{n.removeprefix('base_model.model.')}" for n in names}
    base_now = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert base_now.keys() == before.keys()
    for n, p in base_now.items():
        assert torch.equal(p, before[n]), n                             # frozen, bit for bit
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad(), peft_model.disable_adapter():
        x = torch.tensor([train_ex[0][0]])
        plain = hf.LM(hf.load_model(folder, torch.device("cpu"))).logits(x)
        assert torch.equal(lm.logits(x), plain)                         # adapters off: the base exactly


def test_lora_on_a_bf16_base_trains_fp32_adapters_under_autocast(env):
    """What a CUDA run does (bf16 autocast, the frozen base in bf16), here on the CPU's bf16 autocast."""
    folder = data.require(QWEN)
    model, fmt = hf.load_model(folder, torch.device("cpu"), hf.weights_dtype("bf16", trains=False)), \
        hf.ChatFormat(hf.load_tokenizer(folder))
    assert hf.weights_dtype("bf16", trains=True) == torch.float32 and model.dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hf.add_lora(model, r=4, alpha=8)
    lm = hf.LM(model)
    assert {p.dtype for n, p in lm.named_parameters() if p.requires_grad} == {torch.float32}   # adapters: fp32
    ex = b13.encode_pairs(fmt, [(r["input"], r["output"]) for r in instruction_rows(32)], 64)
    tc = common.TrainConfig(steps=8, lr=1e-2, warmup=0, weight_decay=0.0, eval_interval=0, seed=0)
    hist = b12.train(lm, tc, lambda g: b13.collate(ex[:16]), device=torch.device("cpu"), precision="bf16",
                     loss_fn=b13.sft_loss, log=lambda *a: None)
    assert all(torch.isfinite(torch.tensor(hist["loss"]))) and hist["loss"][-1] < hist["loss"][0]
    base_now = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(p, before[n]) for n, p in base_now.items())


def test_lora_sft_saves_the_adapter_and_b14_merges_it_back(env, tmp_path):
    builds = tmp_path / "builds"
    out, _ = run(b13, sft_config(QWEN, lora_rank=4, lr=1e-2, steps=20), builds, b13.FOLDER)
    m = out.metrics
    assert m["lora"] == {"rank": 4, "alpha": 16.0} and 0 < m["trainable_params"] < m["params"] / 2
    assert all("lora_" in n for n in m["trainable_names"])
    assert m["held_out_loss_sft"] < m["held_out_loss_base"], m
    saved = builds / b13.FOLDER / hf.SFT_DIR
    names = {p.name for p in saved.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names                             # the adapter only: a few KB here
    # what B14 loads: the base with the adapter merged, a plain model giving the same held-out loss
    model, tok, meta = hf.load_sft(saved, torch.device("cpu"))
    assert meta["lora_rank"] == 4 and not any("lora_" in n for n, _ in model.named_parameters())
    held = sft_data.registry_pairs("alpaca-cleaned")[0]
    _, held = sft_data.split_pairs(held, 0.1)
    ex = b13.encode_pairs(hf.ChatFormat(tok), held[:40], 96)
    assert b13.response_loss(hf.LM(model), ex) == pytest.approx(m["held_out_loss_sft"], rel=1e-4)


def test_b13_bad_input_is_one_line(env, tmp_path, monkeypatch):
    with pytest.raises(RunError, match=r"no B12 checkpoint at .*run `tierkit run B12` first, or pick --size char-0.1M"):
        run(b13, sft_config("b12", dataset="hh-rlhf"), tmp_path / "builds", b13.FOLDER)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RunError, match=r"tierkit data fetch smollm2-135m-instruct") as e:
        run(b13, sft_config(LLAMA), tmp_path / "builds", b13.FOLDER)
    assert "\n" not in str(e.value)
    with pytest.raises(RunError, match="qwen2.5-0.5b-instruct-q8_0 is a GGUF file, not a Hugging Face model"):
        run(b13, sft_config("qwen2.5-0.5b-instruct-q8_0"), tmp_path / "builds", b13.FOLDER)
    assert not (tmp_path / "builds" / b13.FOLDER).exists()


# ---------------------------------------------------------------- B14

@pytest.mark.parametrize(("name", "lora_rank"), [(QWEN, 0), (LLAMA, 4)])
def test_dpo_raises_the_held_out_margin_over_the_sft_reference(env, tmp_path, name, lora_rank):
    builds = tmp_path / "builds"
    run(b13, sft_config(name), builds, b13.FOLDER)
    cfg = dpo_config(name, lora_rank=lora_rank, lr=1e-2 if lora_rank else 1e-3, steps=30, pairs=400)
    out, _ = run(b14, cfg, builds, "B14-dpo")
    m = out.metrics
    assert m["reference"].startswith(f"B13 SFT model of {name}") and m["model"] == name
    if lora_rank:
        assert m["lora"] == {"rank": 4, "alpha": 16.0} and 0 < m["trainable_params"] < m["params"] / 2
        assert "adapters disabled" in out.report
    else:
        assert m["trainable_params"] == m["params"] and m["lora"] is None and "full fine-tuning" in out.report
    # measured over 4 seeds: +0.6 to +3.5 (Qwen2 full), +0.8 to +1.8 (Llama LoRA)
    for b in m["betas"]:
        assert b["after"]["margin"] > m["before"]["margin"] + 0.3, (b, m["before"])   # held out, never trained on
    assert m["generations"][0]["reference"] is not None


@contextlib.contextmanager
def counting_models(setup: b14.Setup, cls: type, seen: list[int]):
    """Wrap setup.new_policy: record how many `cls` instances beyond those alive before exist while each policy trains."""
    gc.collect()
    alive = {id(o) for o in gc.get_objects() if type(o) is cls}
    fresh = setup.new_policy

    @contextlib.contextmanager
    def new_policy():
        with fresh() as policy:
            seen.append(sum(1 for o in gc.get_objects() if type(o) is cls and id(o) not in alive))
            yield policy

    setup.new_policy = new_policy
    yield


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_lora_dpo_reference_is_the_adapter_disabled_model(env, tmp_path, lora_rank):
    builds = tmp_path / "builds"
    run(b13, sft_config(LLAMA, steps=10), builds, b13.FOLDER)
    cfg = dpo_config(LLAMA, lora_rank=lora_rank, lr=1e-2 if lora_rank else 1e-3, betas=[0.1, 0.5])
    tmp = builds / "B14-dpo"
    tmp.mkdir()
    ctx = Context(out_dir=tmp, device="cpu", config=cfg, plan=None, profile=None)
    setup = b14.hf_setup(ctx, cfg, LLAMA)
    triples = b14.preference_pairs(sft_data.read_jsonl(HH))[:cfg.pairs]
    train = b14.encode_triples(setup.tok, triples[:-24], cfg.seq)
    held = b14.encode_triples(setup.tok, triples[-24:], cfg.seq)
    with setup.as_reference():
        ref0 = b14.reference_logps(setup.model, train, held, "cpu")
    tc = common.TrainConfig(steps=10, lr=cfg.lr, min_lr=cfg.lr / 10, warmup=2, weight_decay=0.0, eval_interval=5)
    seen: list[int] = []
    with counting_models(setup, type(setup.model.model), seen):
        results, _, _ = b14.sweep(ctx, cfg, setup, tc, train, held, ["Hello?"])
    # LoRA: no model beyond the one loaded (the policy is the reference, adapters on); full: the policy is a
    # second model beside the frozen reference, and only one β's policy lives at a time
    assert seen == ([0, 0] if lora_rank else [1, 1])
    with setup.as_reference():
        ref1 = b14.reference_logps(setup.model, train, held, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(ref0.held + ref0.train, ref1.held + ref1.train, strict=True))
    assert [r["beta"] for r in results] == [0.1, 0.5]
    if lora_rank:   # the adapters of the last β are still on: the policy differs from its reference
        now = b14.reference_logps(setup.model, train, held, "cpu")
        assert not torch.equal(now.held[0], ref0.held[0])


def test_b14_without_the_b13_model_is_one_line(env, tmp_path):
    with pytest.raises(RunError, match=r"no B13 model of qwen2.5-0.5b-instruct under .*: run `tierkit run B13 "
                                       r"--size qwen2.5-0.5b` first") as e:
        run(b14, dpo_config(QWEN), tmp_path / "builds", "B14-dpo")
    assert "\n" not in str(e.value)
    with pytest.raises(RunError, match=r"no B13 model at .*sft.pt: run `tierkit run B13` first"):
        run(b14, b14.Config(model="b13", pairs=50), tmp_path / "builds", "B14-dpo")


# ---------------------------------------------------------------- as a user runs them

def test_cli_b13_then_b14_on_the_planned_hugging_face_rung(env, home):
    cli_env = {"HF_HUB_CACHE": str(env), "HF_HOME": str(env.parent / "hf-home"), "HF_HUB_OFFLINE": "1",
               "TIERKIT_DATA": str(DATA), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    common = ["--profile", "laptop-8gb-cpu", "--set", "lr=1e-3", "--set", "generations=1", "--set", "gen_tokens=8"]
    proc = run_cli("run", "B13", "--size", "smollm2-135m", *common, "--set", "steps=10", "--set", "batch_size=4",
                   "--set", "grad_accum=1", "--set", "block_size=96", home=home, env=cli_env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((home / "builds" / "B13-sft" / "metrics.json").read_text())["metrics"]
    assert m["model"] == LLAMA and m["held_out_loss_sft"] < m["held_out_loss_base"]
    proc = run_cli("run", "B14", "--size", "smollm2-135m", *common, "--set", "steps=6", "--set", "pairs=120",
                   "--set", "seq=96", "--set", "batch_size=4", home=home, env=cli_env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    readme = (home / "builds" / "B14-dpo" / "README.md").read_text()
    assert f"B13 SFT model of {LLAMA}" in readme and "trainable of" in readme
