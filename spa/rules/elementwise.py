"""Element-wise rules: unary ops (identity on every axis) and numpy-broadcasting n-ary ops."""
from __future__ import annotations

from . import Frozen, Rule, identity, register, same_axis_everywhere


@register
class Unary(Rule):
    ops = (
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu",
        "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Abs", "Neg",
        "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Erf", "Sin", "Cos",
        "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN",
        "IsInf", "Identity", "Dropout", "Cast", "Shrink", "Clip", "CastLike", "Swish",
    )

    def propagate(self, c, tensor, axis):
        ins, outs = c.slots(tensor)
        if ins and ins[0] != 0:
            return []  # Clip bounds, CastLike's type source, Dropout ratio: not data
        data = [c.inp(0)] + [o for o in c.node.output if o]
        return same_axis_everywhere(c, tensor, axis, data)


@register
class Broadcast(Rule):
    """N-ary numpy-broadcasting ops: every operand with a full-size axis shares the channel."""

    ops = (
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod", "Where", "Equal",
        "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "PRelu", "BitShift",
        "BitwiseAnd", "BitwiseOr", "BitwiseXor",
    )

    hub_output = True  # an operand links to the output, the output to every operand

    def operands(self, c):
        return [x for x in c.node.input if x]

    def propagate(self, c, tensor, axis):
        out = c.out(0)
        r_out = c.rank(out)
        size = c.dim(tensor, axis)
        out_axis = axis + (r_out - c.rank(tensor))
        links = []
        for t in ([out] if tensor != out else self.operands(c)):
            if t == tensor:
                continue
            a = out_axis - (r_out - c.rank(t))
            if a < 0 or c.dim(t, a) == 1:
                continue  # broadcast along this axis: untouched by channel removal
            if c.dim(t, a) is None:
                raise Frozen(f"size of '{t}' axis {a} unknown")
            links.append(identity((tensor, axis), (t, a), size))
        return links


@register
class FusedActivation(Broadcast):
    """com.microsoft's element-wise fusions (onnxruntime's transformer optimizer and its saved
    graphs): Gelu, FastGelu (x [+ bias]), QuickGelu, BiasGelu (x + bias).
    The bias runs along the last axis: numpy broadcasting, as for Add."""

    domain = "com.microsoft"
    ops = ("Gelu", "FastGelu", "QuickGelu", "BiasGelu")
