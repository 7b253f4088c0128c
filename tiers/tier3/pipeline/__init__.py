"""The `pipeline` engine: the project's own GPT (or a Hugging Face Llama folder) split by layer range.

    head (stage 0, in the serving process)      worker r (stage r, started by an agent)
    PipelineEngine(spec, stages)                python -m tiers.tier3.pipeline worker --rank r ...
      embedding + blocks [0, b0)                  blocks [a_r, b_r) (+ final norm, output, sampling if last)
         | a micro-batch's hidden states (1, N, n_embd) --gloo-->  ... --> last stage --(sampled tokens)--> head

    source.py   what a model spec names; a stage's layers; the tokenizer; the layout placement divides
    stage.py    one stage's computation (a ragged batch, a KV cache per request) and how to split the layers
    wire.py     the messages between stages, over torch.distributed point-to-point
    launch.py   a worker's launch arguments, checked into its argv; the launch through agents
    worker.py   the worker process: epoch after epoch
    head.py     the engine: stage 0 and the scheduler that keeps the pipe full
    stats.py    per-stage compute, bytes per hop, round trips

Why it is built this way:

- Continuous batching: one request is one sequence with its own KV cache on every
  stage; a step runs a micro-batch of requests (each decoding request's next token,
  chunks of new prompts) through a stage as one ragged batch: every matmul over all
  their rows at once (the weights read once per step, what CPU decode is bound by),
  attention per request against its own cache. Requests join and leave between steps.
  With several stages the requests are cut into micro-batches that fill the pipeline:
  while stage 1 computes batch A, the head computes batch B. Stages process messages
  in order, so the head matches replies to the batches it sent first-in, first-out.
- The last stage samples (per request, from a generator seeded by the head) and sends
  back one token, not 200 KB of logits. Greedy and seeded sampling give exactly the
  tokens of single-node ``GPT.generate``.
- Every message carries each stage's compute time for that step, so the head reports
  per-stage compute and, by subtraction from the round trip, the time on the network.
- Transport is torch.distributed point-to-point (gloo; NCCL with ``backend="nccl"`` on
  CUDA nodes) with explicit timeouts on every wait, never the 30-minute default.
- A lost peer breaks the process group for good; torch.distributed needs every rank to
  re-initialise. So sessions have epochs: the head owns a TCPStore (the rendezvous at
  stage 0's host:port); idle workers announce themselves there; when all are present the
  head starts epoch N (a fresh PrefixStore, a fresh process group) and they all join.
  A failure anywhere ends the epoch: in-flight and new requests get EngineUnavailable
  (HTTP 503), workers go back to idle, and the head starts the next epoch as soon as
  every worker is back (e.g. restarted by its agent).

The worker protocol is unauthenticated (like every torch.distributed backend): the
agent's token gates who can start a worker, and addresses should be on the LAN only.
"""
from __future__ import annotations

from tiers.tier3.pipeline.head import PipelineEngine
from tiers.tier3.pipeline.launch import launch, worker_args, worker_command
from tiers.tier3.pipeline.source import NAME, PRESETS, layout, resolve
from tiers.tier3.pipeline.stage import measure_head_blocks, split_layers
from tiers.tier3.pipeline.worker import worker_status

ENGINE = PipelineEngine   # what engines.py's registry builds; launch, layout, worker_command are its other three

__all__ = ["ENGINE", "NAME", "PRESETS", "PipelineEngine", "launch", "layout", "measure_head_blocks", "resolve",
           "split_layers", "worker_args", "worker_command", "worker_status"]
