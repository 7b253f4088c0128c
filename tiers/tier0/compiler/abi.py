"""The kernels' C interface, described once: parameter structs and size formulas.

    CONV = Struct("kws_conv_params_t", ..., ("in_h, in_w, in_c", ""), ...)
        CONV.size                          -> 88      the exporter counts its constants with it
        CONV.declare("op3_p", params)      -> static const kws_conv_params_t op3_p = {.batches = 1, ...};
    CONV2D_SCRATCH = Formula("KWS_CONV2D_SCRATCH_BYTES", "2 * 2 * k_h * k_w * in_c", CONV)
        CONV2D_SCRATCH(params)             -> bytes, for the memory plan
        CONV2D_SCRATCH.define()            -> #define KWS_CONV2D_SCRATCH_BYTES(p) (2 * 2 * (p)->k_h ...)
    KERNELS["conv"] = Kernel(CONV, "kws_conv2d_s8(&{params}, {in0}, {filter}, ...);")   each kernel's call
    header()  -> firmware/lib/kernels/kws_params.h, which kws_kernels.h includes

Why: the exporter writes these structs as const data and sizes each kernel's
scratch in the arena; the kernels read the same structs and use the same
scratch. Written by hand on both sides, a field added in C and not counted in
Python (or a formula changed on one side) would go unnoticed. Here each struct
and each formula is written once, in Python, and the C header is generated
from it: `python -m tiers.tier0.compiler.abi` rewrites it, a test checks the
checked-in header is current, and the header holds a compile-time check that C
lays each struct out in the size Python counts.

A formula is a Python expression over the struct's fields (or over its own
arguments), evaluated here and rendered to C with C's precedence.
"""
from __future__ import annotations

import argparse
import ast
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from inventory.files import atomic_write

KERNELS_DIR = Path(__file__).resolve().parents[3] / "firmware" / "lib" / "kernels"
HEADER = KERNELS_DIR / "kws_params.h"
INT32_BYTES = 4

_DECL = re.compile(r"^(\w+)(?:\[(\w+)\])?$")


# ====================================================================== structs

@dataclass(frozen=True)
class Struct:
    """A C struct of int32_t fields, one declaration line per entry of `lines`."""

    ctype: str
    doc: str                                  # the comment above the typedef
    lines: tuple[tuple[str, str], ...]        # ("in_h, in_w, in_c", "comment"); "dims[KWS_ADD_MAX_DIMS]"
    defines: Mapping[str, int] = field(default_factory=dict)   # array sizes, #defined before the typedef

    @cached_property
    def fields(self) -> dict[str, int]:
        """Field name -> number of int32 elements, in declaration order."""
        out: dict[str, int] = {}
        for names, _ in self.lines:
            for decl in (d.strip() for d in names.split(",")):
                m = _DECL.match(decl)
                if m is None:
                    raise ValueError(f"{self.ctype}: cannot read the declaration {decl!r}")
                n = m.group(2)
                out[m.group(1)] = 1 if n is None else int(self.defines.get(n, n))
        return out

    @property
    def size(self) -> int:
        """sizeof in C: int32_t fields only, so no padding."""
        return INT32_BYTES * sum(self.fields.values())

    def declare(self, name: str, values: Mapping[str, Any]) -> str:
        """A const instance with designated initialisers (fields not given are 0, as C makes them).

        Refuses a field the struct does not have or an array of the wrong length,
        so generated code and kernels cannot disagree on a name.
        """
        inits = []
        for k, v in values.items():
            if k not in self.fields:
                raise ValueError(f"{self.ctype} has no field {k!r} (fields: {', '.join(self.fields)})")
            if isinstance(v, (list, tuple)):
                if len(v) != self.fields[k]:
                    raise ValueError(f"{self.ctype}.{k} holds {self.fields[k]} values, got {len(v)}")
                inits.append(f".{k} = {{{', '.join(str(int(x)) for x in v)}}}")
            else:
                if self.fields[k] != 1:
                    raise ValueError(f"{self.ctype}.{k} is an array of {self.fields[k]}, got one value")
                inits.append(f".{k} = {int(v)}")
        return f"static const {self.ctype} {name} = {{{', '.join(inits)}}};\n"

    def typedef(self) -> str:
        """The typedef, then a line that stops the C build if C's size is not `size`."""
        decls = [f"  int32_t {names};" for names, _ in self.lines]
        col = max(len(d) for d in decls) + 1
        body = [d.ljust(col) + f"/* {c} */" if c else d for d, (_, c) in zip(decls, self.lines)]
        stem = self.ctype.removesuffix("_t")
        return "\n".join([f"/* {self.doc} */", *(f"#define {k} {v}" for k, v in self.defines.items()),
                          "typedef struct {", *body, f"}} {self.ctype};",
                          f"typedef char {stem}_size_check[sizeof({self.ctype}) == {self.size} ? 1 : -1];"])


CONV = Struct("kws_conv_params_t", "CONV_2D, DEPTHWISE_CONV_2D, AVERAGE_POOL_2D, MAX_POOL_2D: one parameter block.", (
    ("batches", ""),
    ("in_h, in_w, in_c", ""),
    ("out_h, out_w, out_c", ""),
    ("k_h, k_w", "filter (conv) or window (pool)"),
    ("stride_h, stride_w", ""),
    ("dil_h, dil_w", "dilation; 1 for pools"),
    ("pad_h, pad_w", "top and left padding; SAME puts any extra at bottom/right"),
    ("depth_mult", "depthwise: out_c = in_c * depth_mult"),
    ("filter_in_c", "conv: input channels per group (== in_c unless grouped)"),
    ("input_offset", "-input zero point"),
    ("output_offset", "output zero point"),
    ("act_min, act_max", "quantised activation range (fused RELU/RELU6 or int8 limits)"),
    ("requant_fast", "conv, depthwise: 1 = the requantisation table's fast form is exact"),
))

FC = Struct("kws_fc_params_t", "FULLY_CONNECTED.", (
    ("batches", "rows of the input: flat size / accum_depth"),
    ("accum_depth", "input features"),
    ("out_depth", "output features"),
    ("input_offset", "-input zero point"),
    ("filter_offset", "-filter zero point (0 for int8 weights; kept as TFLM does)"),
    ("output_offset", ""),
    ("act_min, act_max", ""),
    ("per_channel", "1: one multiplier/shift per output; 0: mult[0], shift[0]"),
))

ADD_MAX_DIMS = 6
ADD = Struct("kws_add_params_t", "ADD, with NumPy-style broadcasting up to 6 dimensions.", (
    ("size", "elements of the output"),
    ("broadcast", "0: same shapes, a flat loop"),
    ("dims[KWS_ADD_MAX_DIMS]", "output shape, padded in front with 1s"),
    ("stride1[KWS_ADD_MAX_DIMS]", "input 1 element strides, 0 on broadcast axes"),
    ("stride2[KWS_ADD_MAX_DIMS]", ""),
    ("left_shift", "20 for int8"),
    ("input1_offset, input1_multiplier, input1_shift", ""),
    ("input2_offset, input2_multiplier, input2_shift", ""),
    ("output_offset, output_multiplier, output_shift", ""),
    ("act_min, act_max", ""),
), defines={"KWS_ADD_MAX_DIMS": ADD_MAX_DIMS})

SOFTMAX = Struct("kws_softmax_params_t", "SOFTMAX, int8 in, int8 out (output scale 1/256, zero point -128).", (
    ("outer", "rows"),
    ("depth", "classes per row"),
    ("input_multiplier", "beta * input_scale * 2^26, quantised"),
    ("input_left_shift", ""),
    ("diff_min", "differences below this give exp() == 0"),
))

STRUCTS = (CONV, FC, ADD, SOFTMAX)


# ====================================================================== kernel calls

@dataclass(frozen=True)
class Kernel:
    """One kernel of kws_kernels.h: its parameter block and how a generated model calls it.

    `call` names its operands as codegen gives them: {params} (the const struct), {in0}, {in1},
    {out} (tensors), {filter}, {bias}, {mult}, {shift}, {rq} (const arrays; a missing bias is 0),
    {scratch} (its arena scratch, or 0).
    """

    struct: Struct | None
    call: str
    filter_ctype: str = "int8_t"      # every other constant array is int32_t


KERNELS = {
    "conv": Kernel(CONV, "kws_conv2d_s8(&{params}, {in0}, {filter}, {bias}, {rq}, {out}, "
                         "(int16_t *)(void *)({scratch}));"),
    "depthwise": Kernel(CONV, "kws_depthwise_conv2d_s8(&{params}, {in0}, {filter}, {bias}, {rq}, {out}, {scratch});",
                        filter_ctype="int16_t"),
    "fc": Kernel(FC, "kws_fully_connected_s8(&{params}, {in0}, {filter}, {bias}, {mult}, {shift}, {out});"),
    "avg_pool": Kernel(CONV, "if (kws_avg_pool_s8(&{params}, {in0}, {out}) != 0) return -1;"),
    "max_pool": Kernel(CONV, "kws_max_pool_s8(&{params}, {in0}, {out});"),
    "add": Kernel(ADD, "kws_add_s8(&{params}, {in0}, {in1}, {out});"),
    "softmax": Kernel(SOFTMAX, "kws_softmax_s8(&{params}, {in0}, {out});"),
    "reshape": Kernel(None, "/* RESHAPE: same bytes, no code */"),     # its output aliases its input
}


# ====================================================================== formulas

# C's binding strengths (higher binds tighter); Python's differ (`a & 3 == 0` groups as `(a & 3) == 0`).
_BIN = {ast.Mult: ("*", 13), ast.Add: ("+", 12), ast.Sub: ("-", 12), ast.LShift: ("<<", 11),
        ast.RShift: (">>", 11), ast.BitAnd: ("&", 8), ast.BitXor: ("^", 7), ast.BitOr: ("|", 6)}
_CMP = {ast.Lt: ("<", 10), ast.LtE: ("<=", 10), ast.Gt: (">", 10), ast.GtE: (">=", 10), ast.Eq: ("==", 9),
        ast.NotEq: ("!=", 9)}
_BOOL = {ast.And: ("&&", 5), ast.Or: ("||", 4)}
_UNARY = {ast.Invert: "~", ast.USub: "-", ast.Not: "!"}
_BITWISE = (6, 7, 8)        # gcc -Wparentheses wants any other operator inside these in parentheses


@dataclass(frozen=True)
class Formula:
    """An integer formula both sides use: evaluated here, #defined as a macro for C.

    Over a struct's fields (`struct` given: the macro takes a pointer `p`), or
    over its own names (each a macro argument, in order of appearance).
    """

    macro: str
    expr: str
    doc: str
    struct: Struct | None = None

    def __post_init__(self) -> None:
        self._c(self._tree.body)      # refuses unknown fields, and what C cannot say the same way

    @cached_property
    def _tree(self) -> ast.Expression:
        return ast.parse(self.expr, mode="eval")

    @cached_property
    def names(self) -> tuple[str, ...]:
        """The names the formula reads, in order of appearance (a plain formula's macro arguments)."""
        found = [n for n in ast.walk(self._tree) if isinstance(n, ast.Name)]
        return tuple(dict.fromkeys(n.id for n in sorted(found, key=lambda n: n.col_offset)))

    def __call__(self, values: Mapping[str, int]) -> int:
        code = compile(self._tree, self.macro, "eval")
        return int(eval(code, {"__builtins__": {}}, {n: int(values[n]) for n in self.names}))

    def define(self) -> str:
        arg = "p" if self.struct is not None else ", ".join(self.names)
        doc = textwrap.wrap(self.doc, 96)
        comment = "\n".join([f"/* {doc[0]}", *(f" * {ln}" for ln in doc[1:])]) + " */"
        return f"{comment}\n#define {self.macro}({arg}) ({self._c(self._tree.body)[0]})"

    def _name(self, name: str) -> str:
        return f"(p)->{name}" if self.struct is not None else f"({name})"

    def _c(self, node: ast.AST) -> tuple[str, int]:
        """(C text, binding strength) of an expression node."""
        def wrap(child: ast.AST, strength: int, right: bool = False) -> str:
            text, s = self._c(child)
            mixed = (strength in _BITWISE and s < 14 and s != strength) or (strength, s) == (4, 5)  # && in ||
            return f"({text})" if s < strength or (right and s == strength) or mixed else text

        if isinstance(node, ast.Name):
            if self.struct is not None and node.id not in self.struct.fields:
                raise ValueError(f"{self.macro}: {node.id} is not a field of {self.struct.ctype}")
            return self._name(node.id), 15
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return str(node.value), 15
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)] + wrap(node.operand, 14), 14
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            op, s = _BIN[type(node.op)]
            return f"{wrap(node.left, s)} {op} {wrap(node.right, s, right=True)}", s
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMP:
            op, s = _CMP[type(node.ops[0])]
            return f"{wrap(node.left, s)} {op} {wrap(node.comparators[0], s, right=True)}", s
        if isinstance(node, ast.BoolOp):
            op, s = _BOOL[type(node.op)]
            return f" {op} ".join(wrap(v, s) for v in node.values), s
        if isinstance(node, ast.IfExp):
            return f"{wrap(node.test, 4)} ? {wrap(node.body, 4)} : {wrap(node.orelse, 3)}", 3
        raise ValueError(f"{self.macro}: {ast.unparse(node)!r} has no C form here")


CONV_PAIR_STRIDE = Formula(
    "KWS_CONV_PAIR_STRIDE", "(2 * K + 3) & ~3",
    "Bytes from one output-channel pair of a packed CONV_2D filter to the next (K per channel).")
CONV2D_SCRATCH = Formula(
    "KWS_CONV2D_SCRATCH_BYTES", "2 * 2 * k_h * k_w * in_c",
    "Bytes of int16 scratch the DSP convolution needs: two pixels' int16 patches, for its 2x2 "
    "(pixels x channels) inner loop.", CONV)
DEPTHWISE_SCRATCH = Formula(
    "KWS_DEPTHWISE_SCRATCH_BYTES",
    "in_c * k_h * ((out_w - 1) * stride_w + (k_w - 1) * dil_w + 1) if depth_mult == 1 and (in_c & 3) == 0 else 0",
    "Bytes of scratch the DSP depthwise path needs: its padded copy of the input rows one output row "
    "reads; 0 where that path does not apply.", CONV)

FORMULAS = (CONV_PAIR_STRIDE, CONV2D_SCRATCH, DEPTHWISE_SCRATCH)


# ====================================================================== the header

def header() -> str:
    """The text of kws_params.h."""
    blocks = [s.typedef() for s in STRUCTS] + [f.define() for f in FORMULAS]
    return "\n".join([
        f"/* {HEADER.name}: the int8 kernels' parameter structs and size formulas.",
        " * GENERATED by `python -m tiers.tier0.compiler.abi` from tiers/tier0/compiler/abi.py; do not",
        " * edit (tests check it is current). The exporter fills these structs, counts their bytes and",
        " * sizes the kernels' scratch from the same description, so the two sides cannot drift; each",
        " * *_size_check typedef stops the build if C lays a struct out in another size. */",
        "#ifndef KWS_PARAMS_H", "#define KWS_PARAMS_H", "", "#include <stdint.h>", "",
        *(b + "\n" for b in blocks),
        "#endif /* KWS_PARAMS_H */", ""])


def write_header(path: str | Path = HEADER) -> Path:
    return atomic_write(path, header())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the int8 kernels' parameter header from its Python description.")
    ap.add_argument("path", nargs="?", type=Path, default=HEADER, help=f"[default: {HEADER}]")
    print(write_header(ap.parse_args(argv).path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
