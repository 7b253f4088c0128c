"""The `vllm` engine: NVIDIA GPU nodes, orchestrated; vLLM itself does the inference.

    every worker node (through its agent):  ray start --address HEAD:6379 --node-ip-address IP --block
    the head:                               ray start --head --port 6379 --node-ip-address IP
                                            vllm serve MODEL --pipeline-parallel-size <nodes>
                                                --tensor-parallel-size <GPUs per node>
                                                --distributed-executor-backend ray --host 127.0.0.1 --port P
    the tierkit server:                     proxies /v1/completions to that vllm serve (VllmEngine)
    tierkit serve:                          layout() from the folder's config; launch() asks each agent for Ray

What was verified where: the command lines, their validation and the proxy are
tested on this CPU-only machine; vLLM's PyPI build is CUDA-only, so Ray and
`vllm serve` have not run here. vLLM's Ray traffic is unauthenticated pickle:
keep the nodes on a private network (REFERENCE.md).
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiers.tier3 import checks
from tiers.tier3.engine import Engine, EngineError, EngineUnavailable, Piece, Sampling
from tiers.tier3.placement import ModelLayout, PlacementError, Plan, engine_stage, layout_from_config

if TYPE_CHECKING:
    from tiers.tier3.client import Workers

NAME = "vllm"
RAY_PORT = 6379


def _endpoint(value: Any, what: str) -> str:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise EngineError(f"{what} must be IPv4:PORT, not {value!r}")
    return f"{checks.ipv4(host, what)}:{int(port)}"


def ray_worker_argv(args: dict[str, Any], ray: str = "ray") -> list[str]:
    """`ray start` joining the head's cluster: args {"head": "IP:PORT", "node_ip": IP, "num_gpus"?}."""
    checks.known_keys(args, {"head", "node_ip", "num_gpus"}, NAME)
    argv = [ray, "start", "--address", _endpoint(args.get("head"), "head"),
            "--node-ip-address", checks.ipv4(args.get("node_ip"), "node_ip"), "--block"]
    if args.get("num_gpus") is not None:
        argv += ["--num-gpus", str(checks.whole(args["num_gpus"], "num_gpus", 0, 64))]
    return argv


def worker_command(args: dict[str, Any]) -> list[str]:
    """What an agent runs for a vllm worker; EngineError when Ray is not installed on this node."""
    argv = ray_worker_argv(args)
    ray = shutil.which("ray", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if ray is None:
        raise EngineError("Ray is not installed on this node: pip install vllm (NVIDIA GPU nodes only)")
    return [ray, *argv[1:]]


def ray_head_argv(node_ip: str, port: int = RAY_PORT) -> list[str]:
    return ["ray", "start", "--head", "--port", str(port), "--node-ip-address", checks.ipv4(node_ip, "node_ip")]


def serve_argv(model: str, pipeline_size: int, tensor_size: int = 1, host: str = "127.0.0.1", port: int = 8001,
               max_model_len: int | None = None) -> list[str]:
    """`vllm serve` with the plan's parallel sizes: one pipeline stage per node, tensor parallel within it."""
    if pipeline_size < 1 or tensor_size < 1:
        raise EngineError("pipeline and tensor parallel sizes must be >= 1")
    argv = ["vllm", "serve", model, "--pipeline-parallel-size", str(pipeline_size), "--tensor-parallel-size",
            str(tensor_size), "--distributed-executor-backend", "ray", "--host", host, "--port", str(port)]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    return argv


class VllmEngine(Engine):
    """Runs `ray start --head` and `vllm serve` on the head, then proxies generation to it.

    opts: upstream="HOST:PORT" proxies to an OpenAI-compatible server already running
    (no Ray, no vllm serve started): that is how the proxy is tested without a GPU.
    """

    name = NAME

    def __init__(self, model_spec: str, stages: list[dict[str, Any]], *, upstream: str | None = None,
                 port: int = 8001, start_timeout: float = 900.0, n_ctx: int | None = None, **_: Any):
        self.model, self.stages = model_spec, stages
        self.model_id = Path(model_spec).name or model_spec
        self.upstream = upstream
        self.port, self.start_timeout, self.n_ctx = port, start_timeout, n_ctx
        self._procs: list[subprocess.Popen] = []

    def commands(self) -> list[list[str]]:
        """What start() runs on the head, in order (empty when proxying an upstream)."""
        if self.upstream:
            return []
        tp = max(int(s.get("gpus", 1)) for s in self.stages)
        return [ray_head_argv(self.stages[0]["host"]),
                serve_argv(self.model, len(self.stages), tp, port=self.port, max_model_len=self.n_ctx)]

    def start(self) -> None:
        if not self.upstream:
            for exe in ("ray", "vllm"):
                if shutil.which(exe) is None:
                    raise EngineError(f"`{exe}` is not installed on the head: pip install vllm (NVIDIA GPUs only)")
            env = {**os.environ, "VLLM_HOST_IP": self.stages[0]["host"]}
            ray_head, vllm_serve = self.commands()
            subprocess.run(ray_head, check=True, env=env, capture_output=True)
            self._procs.append(subprocess.Popen(vllm_serve, env=env))
            self.upstream = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                status, body = self._call("GET", "/v1/models")
                if status == 200:
                    self.model_id = body["data"][0]["id"]
                    return
            except (OSError, ValueError, KeyError, IndexError):
                pass
            if time.monotonic() > deadline:
                raise EngineUnavailable(f"vllm at {self.upstream} did not come up within {self.start_timeout:g} s")
            time.sleep(0.5)

    def _conn(self) -> http.client.HTTPConnection:
        host, _, port = self.upstream.rpartition(":")
        return http.client.HTTPConnection(host, int(port), timeout=60)

    def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        c = self._conn()
        try:
            c.request(method, path, body=json.dumps(body) if body is not None else None,
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, json.loads(r.read())
        finally:
            c.close()

    def tokenize(self, text: str) -> list[int]:
        """vLLM's POST /tokenize (tierkit's server answers it the same way)."""
        try:
            status, body = self._call("POST", "/tokenize", {"model": self.model_id, "prompt": text})
        except OSError as exc:
            raise EngineUnavailable(f"vllm at {self.upstream} unreachable: {exc}") from None
        if status != 200:
            raise EngineError(f"vllm could not tokenize: {body}")
        return body["tokens"]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Piece]:
        body = {"model": self.model_id, "prompt": prompt_ids, "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "stream": True,
                "return_token_ids": True}
        if sampling.top_k:
            body["top_k"] = sampling.top_k
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        c = self._conn()
        try:
            c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            r = c.getresponse()
        except OSError as exc:
            c.close()
            raise EngineUnavailable(f"vllm at {self.upstream} unreachable: {exc}") from None
        if r.status != 200:
            detail = r.read().decode("utf-8", "replace")[:200]
            c.close()
            raise (EngineUnavailable if r.status >= 500 else EngineError)(f"vllm answered {r.status}: {detail}")
        return self._stream(c, r)

    def _stream(self, c: http.client.HTTPConnection, r: http.client.HTTPResponse) -> Iterator[Piece]:
        try:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                msg = json.loads(data)
                if "error" in msg:
                    raise EngineUnavailable(f"vllm: {msg['error'].get('message')}")
                ch = msg["choices"][0]
                yield Piece(text=ch.get("text", ""), token_ids=list(ch.get("token_ids") or []),
                            finish_reason=ch.get("finish_reason"))
        except (OSError, http.client.HTTPException) as exc:
            raise EngineUnavailable(f"lost vllm at {self.upstream} mid-stream: {exc}") from None
        finally:
            c.close()

    def stats(self) -> dict[str, Any]:
        return {"engine": self.name, "model": self.model_id, "upstream": self.upstream,
                "stages": [{"host": s["host"], "layers": s["layers"], "gpus": s.get("gpus", 1)} for s in self.stages],
                "commands": [" ".join(c) for c in self.commands()]}

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        self._procs.clear()


# ---------------------------------------------------------------- what `tierkit serve` asks of this engine

ENGINE = VllmEngine


def layout(model: str, n_ctx: int) -> ModelLayout:
    """A Hugging Face Llama-family folder (what vLLM serves): bf16 weights, KV cache at n_ctx."""
    path = Path(model)
    if not path.is_dir():
        raise PlacementError(f"{model}: vllm serves a local Hugging Face model folder; no such folder here")
    from models.hf_llama import config_from_hf

    cfg = config_from_hf(path)
    return layout_from_config(cfg, name=path.name, dtype_bytes=2, n_ctx=min(n_ctx, cfg.block_size))


def launch(model: str, plan: Plan, workers: Workers, threads: int | None, opts: dict[str, Any],
           gpus_per_node: int = 1) -> list[dict[str, Any]]:
    """Ray workers on every peer (through their agents); the stages the VllmEngine gets."""
    head = plan.stages[0].node
    stages = [engine_stage(plan.stages[0], RAY_PORT, gpus=gpus_per_node)]
    for s in plan.stages[1:]:
        _, w = workers.launch(s.node, NAME, {"head": f"{head.host}:{RAY_PORT}", "node_ip": s.node.host,
                                             "num_gpus": gpus_per_node})
        workers.log(f"worker {w['id']} on {s.node.name}: ray start --address {head.host}:{RAY_PORT}")
        stages.append(engine_stage(s, 0, gpus=gpus_per_node))
    return stages
