"""The registry's Hugging Face entries: models (snapshot folders), GGUF files, and hub-hosted data sets.

    model("gpt2", "openai-community/gpt2", 551 MB, ...)      -> a snapshot folder for from_pretrained
    gguf("llama-3.2-3b-instruct-q8_0", repo, file, 3.42 GB)  -> one .gguf file for llama.cpp
    hub_data("alpaca-cleaned", repo, file, 44 MB)            -> one file of a dataset repository

Sizes are the hub's file listings ("Files and versions"), rounded to what the
listing shows unless given to the byte; they size the free-disk check and
`tierkit data list`. Every download is checked against the hub's own metadata
(each file's size, and the sha256 that is an LFS file's etag) and against the
sha256 recorded here where one was found. A recorded sha256 comes with the
commit it was seen at (bartowski re-uploads some quantisations, so `main` may
hold other bytes later); entries without a confirmed commit follow `main`.
Not confirmed here (the hub could not be reached): the TinyLlama, Llama-3.1-8B,
Qwen2.5-32B, Llama-3.1-70B and Qwen2.5-0.5B Q4_K_M GGUF checksums (re-uploaded
or not listed), the models' exact byte counts, dolly-15k's size.
"""
from __future__ import annotations

from tiers.data.artifacts import HubArtifact

GB, MB = 10**9, 10**6

# What `fetch` takes from a model repository: config, tokenizer and safetensors weights, never the
# duplicate PyTorch/TF/Flax/ONNX weights many repos also hold.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "tokenizer.model", "added_tokens.json", "chat_template.jinja")

APACHE, MIT = "Apache 2.0", "MIT"
LLAMA2 = "Llama 2 Community License"
LLAMA31 = "Llama 3.1 Community License"
LLAMA32 = "Llama 3.2 Community License"


def model(name: str, repo: str, size: int, title: str, licence: str, note: str = "", **kw) -> HubArtifact:
    return HubArtifact(name, title, licence, f"https://huggingface.co/{repo}", repo, "model", MODEL_FILES, size,
                       note=note, **kw)


def gguf(name: str, repo: str, file: str, size: int, title: str, licence: str, base: str, sha: str = "",
         **kw) -> HubArtifact:
    """One GGUF file; `base` is the original model card (its licence terms apply to the quantised file)."""
    return HubArtifact(name, title, licence, f"https://huggingface.co/{base}", repo, "gguf", (file,), size,
                       sha256=((file, sha),) if sha else (), target=file, note=f"{file} from {repo}", **kw)


def hub_data(name: str, repo: str, file: str, size: int, title: str, licence: str, note: str = "",
             **kw) -> HubArtifact:
    return HubArtifact(name, title, licence, f"https://huggingface.co/datasets/{repo}", repo, "data", (file,), size,
                       repo_type="dataset", target=file, note=note, **kw)


_MODELS = (
    model("gpt2", "openai-community/gpt2", 551 * MB, "GPT-2 small (124M)", MIT,
          "OpenAI's 2019 GPT-2, 12 layers, 768 wide; GPT-2 BPE tokenizer"),
    model("gpt2-medium", "openai-community/gpt2-medium", 1_523 * MB, "GPT-2 medium (355M)", MIT),
    model("gpt2-large", "openai-community/gpt2-large", 3_250 * MB, "GPT-2 large (774M)", MIT),
    model("gpt2-xl", "openai-community/gpt2-xl", 6_430 * MB, "GPT-2 XL (1.5B)", MIT),
    model("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", 272 * MB, "SmolLM2-135M-Instruct", APACHE,
          "a real instruction-tuned model small enough to fine-tune on a laptop CPU; ChatML template"),
    model("smollm2-360m-instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", 728 * MB, "SmolLM2-360M-Instruct", APACHE),
    model("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", 999 * MB, "Qwen2.5-0.5B-Instruct", APACHE,
          "494M parameters, bf16 weights; ChatML template"),
    model("tinyllama-1.1b-chat", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", 2_205 * MB, "TinyLlama-1.1B-Chat v1.0",
          APACHE, "Llama-2 architecture and tokenizer, Zephyr chat template"),
    model("pythia-1b", "EleutherAI/pythia-1b", 2_095 * MB, "Pythia-1B (EleutherAI)", APACHE,
          "a base model (no chat template), trained on the Pile; the commit that added model.safetensors",
          revision="f73d7dcc545c8bd326d8559c8ef84ffe92fea6b2"),
)

def ggufs(prefix: str, repo: str, file: str, title: str, licence: str, base: str,
          quants: dict[str, tuple[int, str, str]]) -> tuple[HubArtifact, ...]:
    """One entry per quantisation Q: name `prefix-q`, file `file` with {Q} (or {q}, lower case) filled in.

    quants: Q -> (size, sha256 or "", the commit that sha256 was seen at or "")."""
    return tuple(gguf(f"{prefix}-{q.lower()}", repo, file.format(Q=q, q=q.lower()), size, f"{title} {q}", licence,
                      base, sha, **({"revision": rev} if rev else {}))
                 for q, (size, sha, rev) in quants.items())


# GGUF re-uploads are not gated (Meta's own repositories are: their licence still applies to the weights).
_GGUFS = (
    *ggufs("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-{q}.gguf",
           "Qwen2.5-0.5B-Instruct", APACHE, "Qwen/Qwen2.5-0.5B-Instruct",
           {"Q4_K_M": (491 * MB, "", ""), "Q8_0": (675_710_816, "", "")}),
    *ggufs("tinyllama-1.1b-chat", "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF", "tinyllama-1.1b-chat-v1.0.{Q}.gguf",
           "TinyLlama-1.1B-Chat v1.0", APACHE, "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
           {"Q4_K_M": (669 * MB, "", ""), "Q5_K_M": (783 * MB, "", ""), "Q8_0": (1_170 * MB, "", "")}),
    *ggufs("llama-3.2-1b-instruct", "bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-{Q}.gguf",
           "Llama-3.2-1B-Instruct", LLAMA32, "meta-llama/Llama-3.2-1B-Instruct", {
               "Q4_K_M": (807_694_464, "6f85a640a97cf2bf5b8e764087b1e83da0fdb51d7c9fab7d0fece9385611df83",
                          "d52af3776f99ddf220e5ffd3f93b2a4e4df105be"),
               "Q8_0": (1_320 * MB, "", "")}),
    *ggufs("llama-3.2-3b-instruct", "bartowski/Llama-3.2-3B-Instruct-GGUF", "Llama-3.2-3B-Instruct-{Q}.gguf",
           "Llama-3.2-3B-Instruct", LLAMA32, "meta-llama/Llama-3.2-3B-Instruct", {
               "Q4_K_M": (2_020 * MB, "6c1a2b41161032677be168d354123594c0e6e67d2b9227c84f296ad037c728ff",
                          "c346bfc2029e79ba6d7edf026cf01fe44242db0d"),
               "Q5_K_M": (2_320 * MB, "0b94ccd04d908304cec5246a3d942b64417a423bc5c6d47c73bc557e590b5194",
                          "160b1f96c09b162843e6aafcce507ff45438b56e"),
               "Q8_0": (3_420 * MB, "b5607b5090a8280063fff2d706bb3408ca6542341b06aab39c3eca0a28575921",
                        "5ab33fa94d1d04e903623ae72c95d1696f09f9e8")}),
    # re-uploaded several times (three Q4_K_M sha256s seen): follows main, checked by the hub's own sha256
    *ggufs("llama-3.1-8b-instruct", "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "Meta-Llama-3.1-8B-Instruct-{Q}.gguf",
           "Llama-3.1-8B-Instruct", LLAMA31, "meta-llama/Llama-3.1-8B-Instruct",
           {"Q4_K_M": (4_920 * MB, "", ""), "Q5_K_M": (5_730 * MB, "", ""), "Q8_0": (8_540 * MB, "", "")}),
    *ggufs("llama-2-13b-chat", "TheBloke/Llama-2-13B-chat-GGUF", "llama-2-13b-chat.{Q}.gguf", "Llama-2-13B-chat",
           LLAMA2, "meta-llama/Llama-2-13b-chat-hf", {
               "Q4_K_M": (7_870 * MB, "7ddfe27f61bf994542c22aca213c46ecbd8a624cca74abff02a7b5a8c18f787f", ""),
               "Q8_0": (13_830 * MB, "9f4d06112114dd1b48023305578ad52b690d3aee42181631a2bddbe856f75ae6", "")}),
    *ggufs("qwen2.5-32b-instruct", "bartowski/Qwen2.5-32B-Instruct-GGUF", "Qwen2.5-32B-Instruct-{Q}.gguf",
           "Qwen2.5-32B-Instruct", APACHE, "Qwen/Qwen2.5-32B-Instruct", {"Q4_K_M": (19_900 * MB, "", "")}),
    *ggufs("llama-3.1-70b-instruct", "bartowski/Meta-Llama-3.1-70B-Instruct-GGUF",
           "Meta-Llama-3.1-70B-Instruct-{Q}.gguf", "Llama-3.1-70B-Instruct", LLAMA31,
           "meta-llama/Llama-3.1-70B-Instruct", {"Q4_K_M": (42_500 * MB, "", "")}),
)

_DATA = (
    # The commit is the one the hub's file listing showed holding this file (f54c09f, "add some metadata").
    hub_data("tinystories", "roneneldan/TinyStories", "TinyStoriesV2-GPT4-train.txt", 2_230 * MB,
             "TinyStories V2 (GPT-4 stories), train split as plain text", "CDLA-Sharing 1.0",
             "~2.7M short stories in simple English, each ended by <|endoftext|>; hold out a slice for validation",
             revision="f54c09fd23315a6f9c86f9dc80f725de7d8f9c64"),
    hub_data("alpaca-cleaned", "yahma/alpaca-cleaned", "alpaca_data_cleaned.json", 44_307_561,
             "Alpaca, cleaned (instruction, input, output)", "CC BY 4.0",
             "51,760 instruction-following pairs: one JSON array of {instruction, input, output}"),
    hub_data("dolly-15k", "databricks/databricks-dolly-15k", "databricks-dolly-15k.jsonl", 13_100_000,
             "Dolly 15k (Databricks employees' instruction pairs)", "CC BY-SA 3.0",
             "15,011 lines of {instruction, context, response, category}"),
)

HUB: tuple[HubArtifact, ...] = _MODELS + _GGUFS + _DATA
