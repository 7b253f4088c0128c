"""Pricing: one function per cost model, from a rung of the ladder to memory and time on a device.

    PRICERS[milestone.cost](rung, target, profile, milestone) -> Priced

    training.py    gpt-train, dpo, mlp-train, cnn-train, lstm-train
    inference.py   quant-lab, gpt-infer, gguf-decode, gguf-split
    classic.py     probe, matmul, tabular-q, bpe, skipgram, vector-search, embeddings
    boards.py      dscnn
    generative.py  gen-train (VAE, GAN, DDPM), rl-train (DQN, PPO), classic-ml (trees, SVMs)
    transformers.py encoder-train (ViT, BERT, CLIP), whisper-infer, moe-train, spec-decode

models/costs.py counts what a workload needs (parameters, FLOPs, bytes); a pricer
divides that by what the target *measured* it can do, times an efficiency for the
kind of work (the fraction of a large matmul's FLOP/s, or of a STREAM triad's
bandwidth, that such code reaches), and adds what every process pays (startup,
runtime memory). The constants sit beside the pricers that use them, each with
its source. milestones.yaml names each milestone's cost model; this table is the
one place a cost model meets its pricer.
"""
from __future__ import annotations

from tiers.fit.pricing.boards import price_dscnn
from tiers.fit.pricing.classic import (
                                       price_bpe,
                                       price_matmul,
                                       price_probe,
                                       price_skipgram,
                                       price_tabular_q,
                                       price_vector_search,
)
from tiers.fit.pricing.common import Priced, Pricer
from tiers.fit.pricing.generative import price_classic_ml, price_gen_train, price_rl_train
from tiers.fit.pricing.inference import price_gguf_decode, price_gguf_split, price_gpt_infer, price_quant_lab
from tiers.fit.pricing.training import price_cnn_train, price_dpo, price_gpt_train, price_lstm_train, price_mlp_train
from tiers.fit.pricing.transformers import (
                                            price_encoder_train,
                                            price_moe_train,
                                            price_spec_decode,
                                            price_whisper_infer,
)

PRICERS: dict[str, Pricer] = {
    "probe": price_probe, "tabular-q": price_tabular_q, "bpe": price_bpe, "skipgram": price_skipgram,
    "mlp-train": price_mlp_train, "matmul": price_matmul, "dscnn": price_dscnn, "cnn-train": price_cnn_train,
    "lstm-train": price_lstm_train, "gpt-train": price_gpt_train, "dpo": price_dpo, "quant-lab": price_quant_lab,
    "gpt-infer": price_gpt_infer, "vector-search": price_vector_search, "embeddings": price_vector_search,
    "gguf-decode": price_gguf_decode, "gguf-split": price_gguf_split,
    "gen-train": price_gen_train, "rl-train": price_rl_train, "classic-ml": price_classic_ml,
    "encoder-train": price_encoder_train, "whisper-infer": price_whisper_infer, "moe-train": price_moe_train,
    "spec-decode": price_spec_decode,
}

__all__ = ["PRICERS", "Priced", "Pricer"]
