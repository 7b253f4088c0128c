"""C code generation: the lowered steps and the memory plan as model.c and model.h.

    model.h   sizes, quantisation of the input and output, <prefix>_invoke(in, out)
    model.c   const arrays (weights, biases, requantisation rows), const parameter structs,
              one static arena, and <prefix>_invoke_io(), which is the list of kernel calls:

                  /* op 3: DEPTHWISE_CONV_2D [1, 25, 5, 64] -> [1, 25, 5, 64] */
                  kws_depthwise_conv2d_s8(&op3_p, (ARENA + 0), op3_filter, op3_bias, op3_rq, (ARENA + 384), ...);

Every activation is a fixed address: `ARENA + offset` from the plan, or the
caller's input and output buffers. Each step renders its own call (its
kernel's entry in abi.KERNELS); this module names the operands, declares the
constants, counts their bytes (the structs' sizes from abi.py) and writes the
two files' text.
A debug build (`-D<PREFIX>_DEBUG`) calls a hook after every op, which the
tests use to compare every intermediate tensor with TFLite Micro.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tiers.tier0.compiler import ExportError
from tiers.tier0.compiler.lowering import CONST_ORDER, CTYPE_BYTES, Operands, Step
from tiers.tier0.compiler.memory import MemoryPlan
from tiers.tier0.compiler.tflite import Model


def _c_array(ctype: str, name: str, values: np.ndarray, per_line: int = 24, align: bool = False) -> str:
    vals = [str(int(v)) for v in np.asarray(values).reshape(-1)]
    if not vals:
        vals = ["0"]
    lines = [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    body = ",\n  ".join(lines)
    return f"static const {ctype} {name}[{len(vals)}]{' KWS_ALIGN4' if align else ''} = {{\n  {body}\n}};\n"


def ident(s: str) -> str:
    """`s` as a C identifier: other characters become '_', and it never starts with a digit."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in s)
    if not out or out[0].isdigit():
        out = "_" + out
    return out


class _Body:
    """The kernel calls of <prefix>_invoke_io and the constants they name, with the bytes those take."""

    def __init__(self, m: Model, plan: MemoryPlan, dump: str):
        self.m, self.plan, self.dump = m, plan, dump
        self.decls: list[str] = []
        self.lines: list[str] = []
        self.const_bytes = 0
        self._const_names: dict[int, str] = {}

    def declare(self, decl: str, nbytes: int) -> None:
        self.decls.append(decl)
        self.const_bytes += nbytes

    def ptr(self, t: int, writable: bool = False) -> str:
        """Where tensor t lives, as a C expression."""
        b = self.plan.buffers[self.plan.tensor_buffer[t]]
        if b.kind == "arena":
            return f"(ARENA + {b.offset})"
        if b.kind == "input":
            if writable:
                raise ExportError(f"tensor {t} would be written into the caller's input buffer")
            return f"inputs[{b.ext}]"
        if b.kind == "output":
            return f"outputs[{b.ext}]"
        if t not in self._const_names:   # a constant activation operand (e.g. ADD with a constant): a flash array
            src = next(x for x in b.tensors if self.m.tensors[x].data is not None)
            self._const_names[t] = f"c{src}"
            self.declare(_c_array("int8_t", f"c{src}", self.m.tensors[src].data), self.m.tensors[src].nbytes)
        return self._const_names[t]

    def step(self, i: int, s: Step) -> None:
        tag = f"op{i}"
        names = {}
        for key in (k for k in CONST_ORDER if k in s.consts):
            ctype, values = s.ctype(key), s.consts[key]
            names[key] = f"{tag}_{key}"
            self.declare(_c_array(ctype, names[key], values, align=key == "filter"), values.size * CTYPE_BYTES[ctype])
        out = self.ptr(s.output, writable=s.kernel != "reshape")
        ins = [self.ptr(t) for t in s.act_inputs]
        if s.struct is not None:
            self.declare(s.struct.declare(f"{tag}_p", s.params), s.struct.size)
        scratch = f"ARENA + {self.plan.buffers[s.scratch_buffer].offset}" if s.scratch_buffer >= 0 else None
        y = self.m.tensors[s.output]
        self.lines.append(f"  /* op {i}: {s.op.name} {list(self.m.tensors[s.act_inputs[0]].shape)} -> "
                          f"{list(y.shape)} */\n  {s.call(Operands(f'{tag}_p', names, ins, out, scratch))}\n"
                          f"  {self.dump}({i}, {s.output}, {self.ptr(s.output)}, {y.nbytes});\n")

    def copy_out(self, k: int, buffer_id: int) -> None:
        src = self.ptr(self.plan.buffers[buffer_id].tensors[0])
        self.lines.append(f"  memcpy(outputs[{k}], {src}, {self.m.tensors[self.m.outputs[k]].nbytes});  "
                          f"/* graph output {k} */\n")


def generate_c(m: Model, steps: list[Step], plan: MemoryPlan, *, prefix: str = "kws_model",
               header: str = "model.h", source_name: str = "model.tflite") -> tuple[str, str, int]:
    """(model.c text, model.h text, bytes of constants)."""
    P, U = ident(prefix), ident(prefix).upper()
    body = _Body(m, plan, f"{U}_DUMP")
    for i, s in enumerate(steps):
        body.step(i, s)
    for k, bid in plan.copies_out:
        body.copy_out(k, bid)
    single = len(m.inputs) == 1 and len(m.outputs) == 1
    h = _header_text(m, steps, plan, P, U, header, source_name, body.const_bytes, single)
    return _source_text(m, steps, plan, P, U, header, source_name, body, single), h, body.const_bytes


def _io_defines(U: str, what: str, tensors: list) -> list[str]:
    out = []
    for k, t in enumerate(tensors):
        sfx = "" if k == 0 else f"_{k}"
        out += [f"#define {U}_{what}{sfx}_SIZE {t.size}   /* int8, shape {list(t.shape)} */",
                f"#define {U}_{what}{sfx}_SCALE {t.scale!r}f",
                f"#define {U}_{what}{sfx}_ZERO_POINT ({t.zero_point})"]
    return out


def _header_text(m: Model, steps: list[Step], plan: MemoryPlan, P: str, U: str, header: str, source_name: str,
                 const_bytes: int, single: bool) -> str:
    return "\n".join([
        f"/* {header}: generated by `tierkit kws export` from {source_name}; do not edit. */",
        f"#ifndef {U}_H", f"#define {U}_H", "", "#include <stdint.h>", "",
        "#ifdef __cplusplus", 'extern "C" {', "#endif", "",
        f"#define {U}_ARENA_BYTES {plan.arena_bytes}   /* static RAM for activations (the arena in {Path(header).stem}.c) */",
        f"#define {U}_CONST_BYTES {const_bytes}   /* weights, biases, requantisation tables (flash) */",
        f"#define {U}_NUM_INPUTS {len(m.inputs)}", f"#define {U}_NUM_OUTPUTS {len(m.outputs)}",
        f"#define {U}_NUM_OPS {len(steps)}",
        *_io_defines(U, "INPUT", [m.tensors[t] for t in m.inputs]),
        *_io_defines(U, "OUTPUT", [m.tensors[t] for t in m.outputs]),
        "",
        "/* Run the model: `in` holds the quantised input (q = round(x / SCALE) + ZERO_POINT, clamped",
        " * to int8), `out` receives the int8 output. Returns 0, or -1 if an average pool window was",
        " * empty. Not reentrant: the activations live in one static arena. */",
        *([f"int {P}_invoke(const int8_t *in, int8_t *out);", ""] if single else
          [f"/* ({P}_invoke(in, out) exists for one-input one-output models only.) */", ""]),
        "/* Any model: inputs and outputs in graph order. */",
        f"int {P}_invoke_io(const int8_t *const *inputs, int8_t *const *outputs);",
        "",
        f"#ifdef {U}_DEBUG",
        "/* Debug builds call this after every op with the tensor it wrote (TFLite tensor index). */",
        f"typedef void (*{P}_debug_fn)(int op, int tensor, const int8_t *data, int32_t bytes, void *user);",
        f"void {P}_set_debug_hook({P}_debug_fn fn, void *user);",
        "#endif", "", "#ifdef __cplusplus", "}", "#endif", "", f"#endif /* {U}_H */", ""])


def _layout(m: Model, steps: list[Step], plan: MemoryPlan) -> list[str]:
    """The memory plan as comment lines: where each op's output and scratch live."""
    def where(s: Step) -> str:
        b = plan.buffers[plan.tensor_buffer[s.output]]
        return f"arena [{b.offset}, {b.offset + m.tensors[s.output].nbytes})" if b.kind == "arena" else b.kind

    outputs = [f" *   op {i:>2} {s.op.name:<18} t{s.output:<4} " + where(s) for i, s in enumerate(steps)]
    scratch = [f" *   op {i:>2} scratch               arena [{plan.buffers[s.scratch_buffer].offset}, "
               f"{plan.buffers[s.scratch_buffer].offset + s.scratch})"
               for i, s in enumerate(steps) if s.scratch_buffer >= 0]
    return outputs + scratch


def _source_text(m: Model, steps: list[Step], plan: MemoryPlan, P: str, U: str, header: str, source_name: str,
                 body: _Body, single: bool) -> str:
    return "\n".join([
        f"/* Generated by `tierkit kws export` from {source_name}; do not edit.",
        " *",
        f" * {len(steps)} ops, arena {plan.arena_bytes} B (outputs may overlap the inputs they consume;",
        " * see tiers/tier0/export.py). Memory plan:",
        *_layout(m, steps, plan), " */",
        f'#include "{header}"', "", '#include <string.h>', "", '#include "kws_kernels.h"', "",
        *(["/* int32 alignment for the int16 scratch and the DSP path's word loads */",
           f"static union {{ int32_t align; int8_t bytes[{plan.arena_bytes}]; }} {P}_arena;",
           f"#define ARENA ({P}_arena.bytes)"] if plan.arena_bytes else ["/* no arena: nothing to store */"]),
        "",
        f"#ifdef {U}_DEBUG",
        f"static {P}_debug_fn dbg_fn;", "static void *dbg_user;",
        f"void {P}_set_debug_hook({P}_debug_fn fn, void *user) {{ dbg_fn = fn; dbg_user = user; }}",
        f"#define {U}_DUMP(op, t, p, n) do {{ if (dbg_fn) dbg_fn((op), (t), (p), (n), dbg_user); }} while (0)",
        "#else",
        f"#define {U}_DUMP(op, t, p, n) ((void)0)",
        "#endif", "", *body.decls, "",
        f"int {P}_invoke_io(const int8_t *const *inputs, int8_t *const *outputs) {{",
        "  (void)inputs; (void)outputs;", *body.lines, "  return 0;", "}", "",
        *([f"int {P}_invoke(const int8_t *in, int8_t *out) {{",
           "  const int8_t *ins[1]; int8_t *outs[1];",
           "  ins[0] = in; outs[0] = out;",
           f"  return {P}_invoke_io(ins, outs);", "}", ""] if single else [])])
