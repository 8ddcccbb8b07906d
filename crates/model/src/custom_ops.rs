//! The operations a custom loss ([`crate::custom_loss`]) may call, and how each runs on
//! libtorch: torch functions and the matching `Tensor` methods, `torch.nn.functional`
//! activations, Python's `operator` functions (arithmetic, comparisons, indexing), a few `math`
//! functions on Python numbers, and `getattr` for a tensor's shape and dtype.
//!
//! Arguments follow PyTorch's signatures (positional or by keyword); a Python number next to a
//! tensor is passed as a scalar, so type promotion is PyTorch's (a float32 tensor times 0.5 stays
//! float32). Anything outside this list is refused when the loss is created, naming the node.

use std::fmt;

use tch::{Kind, Scalar, Tensor};

use crate::error::{ModelError, Result};

/// Most elements any tensor a custom loss creates may hold (64 Mi floats, 256 MiB).
pub const MAX_ELEMENTS: i64 = 1 << 26;

/// Most work one evaluation of a custom loss (one datum) may do: elements of every tensor it
/// creates (autograd may keep them all: 1 GiB of f32) plus the multiply-adds of its matmuls
/// (a fraction of a second of one core). A loss over a datum's logprobs needs far less; a
/// tenant's loss must not hold the worker that serves every tenant, nor its memory.
pub const MAX_WORK: i64 = 1 << 28;

thread_local! {
    /// Work left to the evaluation running on this thread (see [`MAX_WORK`]).
    static WORK_LEFT: std::cell::Cell<i64> = const { std::cell::Cell::new(MAX_WORK) };
}

/// Gives the evaluation about to run on this thread its whole [`MAX_WORK`].
pub fn reset_work() {
    WORK_LEFT.with(|w| w.set(MAX_WORK));
}

/// Charges `work` to the running evaluation, before the work is done; refuses it (naming
/// `what`) once the budget is spent, or when one tensor would exceed [`MAX_ELEMENTS`].
fn charge(work: i64, what: &str) -> Result<()> {
    WORK_LEFT.with(|left| {
        let rest = left.get().saturating_sub(work.max(0));
        if rest < 0 {
            return Err(bad(format!(
                "{what} would exceed the work one loss may do per datum ({MAX_WORK} elements created plus multiply-adds)"
            )));
        }
        left.set(rest);
        Ok(())
    })
}

/// The number of elements of `shapes` broadcast together (an upper bound when they do not
/// broadcast: libtorch then refuses them).
fn broadcast_numel(shapes: &[Vec<i64>]) -> i64 {
    let rank = shapes.iter().map(Vec::len).max().unwrap_or(0);
    (0..rank)
        .map(|i| {
            shapes
                .iter()
                .filter_map(|s| s.len().checked_sub(rank - i).map(|j| s[j]))
                .max()
                .unwrap_or(1)
                .max(0)
        })
        .fold(1i64, |acc, d| acc.saturating_mul(d))
}

/// Refuses a result of more than [`MAX_ELEMENTS`] elements before it is computed.
fn check_elements(n: i64, what: &str) -> Result<()> {
    if n > MAX_ELEMENTS {
        return Err(bad(format!(
            "{what} would make a tensor of {n} elements; at most {MAX_ELEMENTS} are accepted"
        )));
    }
    Ok(())
}

/// A runtime value of a custom loss.
#[derive(Debug)]
pub enum Value {
    /// Python `None`.
    None,
    /// A Python bool.
    Bool(bool),
    /// A Python int.
    Int(i64),
    /// A Python float.
    Float(f64),
    /// A string (a method or attribute name argument).
    Str(String),
    /// A list (`false`) or tuple (`true`), a shape among them.
    Seq(Vec<Value>, bool),
    /// A dict with string keys.
    Dict(Vec<(String, Value)>),
    /// A slice `start:stop:step`.
    Slice(Option<i64>, Option<i64>, Option<i64>),
    /// `...`.
    Ellipsis,
    /// A torch dtype.
    Dtype(Kind),
    /// A device, layout or memory format: accepted and ignored (a loss runs where its inputs are).
    Device,
    /// A tensor.
    Tensor(Tensor),
    /// `(values, indices)` of `max`/`min` along a dimension.
    ValuesIndices(Tensor, Tensor),
}

impl Clone for Value {
    fn clone(&self) -> Self {
        self.dup()
    }
}

impl Value {
    /// Another handle on the same value (tensors are shared, not copied).
    pub fn dup(&self) -> Value {
        match self {
            Value::None => Value::None,
            Value::Bool(b) => Value::Bool(*b),
            Value::Int(i) => Value::Int(*i),
            Value::Float(f) => Value::Float(*f),
            Value::Str(s) => Value::Str(s.clone()),
            Value::Seq(items, tuple) => Value::Seq(items.iter().map(Value::dup).collect(), *tuple),
            Value::Dict(entries) => {
                Value::Dict(entries.iter().map(|(k, v)| (k.clone(), v.dup())).collect())
            }
            Value::Slice(a, b, c) => Value::Slice(*a, *b, *c),
            Value::Ellipsis => Value::Ellipsis,
            Value::Dtype(k) => Value::Dtype(*k),
            Value::Device => Value::Device,
            Value::Tensor(t) => Value::Tensor(t.shallow_clone()),
            Value::ValuesIndices(v, i) => {
                Value::ValuesIndices(v.shallow_clone(), i.shallow_clone())
            }
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Seq(..) => "a sequence",
            Value::Dict(_) => "a dict",
            Value::Slice(..) => "a slice",
            Value::Ellipsis => "an ellipsis",
            Value::Dtype(_) => "a dtype",
            Value::Device => "a device",
            Value::Tensor(_) => "a tensor",
            Value::ValuesIndices(..) => "a (values, indices) pair",
        }
    }
}

fn bad(reason: impl Into<String>) -> ModelError {
    ModelError::invalid("graph", reason)
}

/// A torch dtype by the name the SDK sends (`float32`, `int64`, ...).
pub fn parse_dtype(name: &str) -> Result<Kind> {
    Ok(match name {
        "float32" | "float" => Kind::Float,
        "float64" | "double" => Kind::Double,
        "float16" | "half" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "int64" | "long" => Kind::Int64,
        "int32" | "int" => Kind::Int,
        "int16" => Kind::Int16,
        "int8" => Kind::Int8,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        other => return Err(bad(format!("unsupported dtype `{other}`"))),
    })
}

/// Operations on tensors, callable as `torch.<name>` and (those with a tensor first) as a
/// `Tensor` method.
const TENSOR_OPS: &[&str] = &[
    // elementwise, one tensor
    "exp",
    "exp2",
    "expm1",
    "log",
    "log1p",
    "log2",
    "log10",
    "sigmoid",
    "tanh",
    "relu",
    "abs",
    "neg",
    "negative",
    "sqrt",
    "rsqrt",
    "square",
    "sign",
    "floor",
    "ceil",
    "round",
    "trunc",
    "reciprocal",
    "sin",
    "cos",
    "erf",
    "logical_not",
    "isnan",
    "isinf",
    "isfinite",
    "detach",
    "nan_to_num",
    "log_sigmoid",
    "logsigmoid",
    "softplus",
    "silu",
    "gelu",
    "elu",
    "expit",
    // elementwise, two operands
    "add",
    "sub",
    "subtract",
    "mul",
    "multiply",
    "div",
    "divide",
    "true_divide",
    "pow",
    "minimum",
    "maximum",
    "fmin",
    "fmax",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_and",
    "logical_or",
    "logical_xor",
    "xlogy",
    "logaddexp",
    "rsub",
    "where",
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
    "masked_fill",
    "lerp",
    // reductions and scans
    "sum",
    "mean",
    "prod",
    "amax",
    "amin",
    "max",
    "min",
    "logsumexp",
    "std",
    "var",
    "all",
    "any",
    "argmax",
    "argmin",
    "count_nonzero",
    "cumsum",
    "softmax",
    "log_softmax",
    // shape
    "view",
    "reshape",
    "unsqueeze",
    "squeeze",
    "flatten",
    "transpose",
    "permute",
    "t",
    "expand",
    "expand_as",
    "contiguous",
    "clone",
    "narrow",
    "select",
    "flip",
    "stack",
    "cat",
    "concat",
    "gather",
    "index_select",
    "size",
    "dim",
    "numel",
    "matmul",
    "dot",
    // dtype
    "to",
    "type_as",
    "float",
    "double",
    "half",
    "bfloat16",
    "long",
    "int",
    "bool",
    // creation
    "zeros_like",
    "ones_like",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_tensor",
    "zeros",
    "ones",
    "full",
    "arange",
    "tensor",
    "scalar_tensor",
];

/// Python `operator` functions (arithmetic, comparisons and indexing on tensors and numbers).
const OPERATOR_OPS: &[&str] = &[
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "getitem", "lt",
    "le", "gt", "ge", "eq", "ne", "and_", "or_", "xor", "invert", "not_", "matmul",
];

/// `math` functions of Python numbers.
const MATH_OPS: &[&str] = &[
    "log", "exp", "sqrt", "floor", "ceil", "log2", "log10", "log1p",
];

/// Attributes `getattr` may read.
const ATTRIBUTES: &[&str] = &[
    "shape", "dtype", "ndim", "T", "mT", "values", "indices", "device",
];

/// What a node calls, resolved when the loss is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callee {
    /// A torch function (`torch.exp`, `torch.nn.functional.softplus`, ...).
    Function(&'static str),
    /// A `Tensor` method, the tensor first.
    Method(&'static str),
    /// A Python `operator` function.
    Operator(&'static str),
    /// A `math` function.
    Math(&'static str),
    /// `getattr(value, name)`.
    GetAttr,
}

impl fmt::Display for Callee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Callee::Function(n) => write!(f, "torch.{n}"),
            Callee::Method(n) => write!(f, "Tensor.{n}"),
            Callee::Operator(n) => write!(f, "operator.{n}"),
            Callee::Math(n) => write!(f, "math.{n}"),
            Callee::GetAttr => write!(f, "getattr"),
        }
    }
}

fn find(list: &[&'static str], name: &str) -> Option<&'static str> {
    list.iter().copied().find(|n| *n == name)
}

impl Callee {
    /// The callee of a node (`op` `call_function` or `call_method`, `target` as torch.fx
    /// names it), if loraloom runs it.
    pub fn resolve(op: &str, target: &str) -> Result<Callee> {
        let unknown = || {
            bad(format!(
                "`{target}` is not an operation loraloom runs in a custom loss (torch and Tensor tensor functions, torch.nn.functional activations, operator and math functions; see docs/custom-losses.md)"
            ))
        };
        if op == "call_method" {
            return find(TENSOR_OPS, target)
                .filter(|n| {
                    !matches!(
                        *n,
                        "stack"
                            | "cat"
                            | "concat"
                            | "zeros"
                            | "ones"
                            | "full"
                            | "arange"
                            | "tensor"
                            | "scalar_tensor"
                    )
                })
                .map(Callee::Method)
                .ok_or_else(unknown);
        }
        if target == "getattr" || target == "builtins.getattr" {
            return Ok(Callee::GetAttr);
        }
        if let Some(name) = target.strip_prefix("operator.") {
            return find(OPERATOR_OPS, name)
                .map(Callee::Operator)
                .ok_or_else(unknown);
        }
        if let Some(name) = target.strip_prefix("math.") {
            return find(MATH_OPS, name).map(Callee::Math).ok_or_else(unknown);
        }
        let name = [
            "torch.nn.functional.",
            "torch._C._nn.",
            "torch.special.",
            "torch.",
        ]
        .iter()
        .find_map(|p| target.strip_prefix(p))
        .filter(|n| !n.contains('.'))
        .ok_or_else(unknown)?;
        find(TENSOR_OPS, name)
            .filter(|n| {
                !n.starts_with("new_")
                    && !matches!(
                        *n,
                        "size"
                            | "dim"
                            | "type_as"
                            | "expand_as"
                            | "to"
                            | "float"
                            | "double"
                            | "half"
                            | "bfloat16"
                            | "long"
                            | "int"
                            | "bool"
                            | "view"
                            | "contiguous"
                            | "expand"
                    )
            })
            .map(Callee::Function)
            .ok_or_else(unknown)
    }
}

/// A node's arguments, bound to parameter names as Python binds them: positionally first,
/// then by keyword. Every argument must be used ([`Call::finish`]).
struct Call {
    args: Vec<Option<Value>>,
    kwargs: Vec<(String, Option<Value>)>,
}

impl Call {
    fn new(args: Vec<Value>, kwargs: Vec<(String, Value)>) -> Self {
        Call {
            args: args.into_iter().map(Some).collect(),
            kwargs: kwargs.into_iter().map(|(k, v)| (k, Some(v))).collect(),
        }
    }

    /// The argument at position `pos`, or keyword `key`.
    fn take(&mut self, pos: usize, key: &str) -> Option<Value> {
        if let Some(v) = self.args.get_mut(pos).and_then(Option::take) {
            return Some(v);
        }
        self.kwargs
            .iter_mut()
            .find(|(k, v)| k == key && v.is_some())
            .and_then(|(_, v)| v.take())
    }

    fn required(&mut self, pos: usize, key: &str) -> Result<Value> {
        self.take(pos, key)
            .ok_or_else(|| bad(format!("missing argument `{key}`")))
    }

    fn tensor(&mut self, pos: usize, key: &str) -> Result<Tensor> {
        match self.required(pos, key)? {
            Value::Tensor(t) => Ok(t),
            other => Err(bad(format!(
                "`{key}` must be a tensor, got {}",
                other.describe()
            ))),
        }
    }

    fn operand(&mut self, pos: usize, key: &str) -> Result<Operand> {
        Operand::of(self.required(pos, key)?, key)
    }

    fn opt_int(&mut self, pos: usize, key: &str) -> Result<Option<i64>> {
        match self.take(pos, key) {
            None | Some(Value::None) => Ok(None),
            Some(v) => int_of(&v, key).map(Some),
        }
    }

    fn int(&mut self, pos: usize, key: &str) -> Result<i64> {
        int_of(&self.required(pos, key)?, key)
    }

    fn bool_or(&mut self, pos: usize, key: &str, default: bool) -> Result<bool> {
        match self.take(pos, key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(b),
            Some(other) => Err(bad(format!(
                "`{key}` must be a bool, got {}",
                other.describe()
            ))),
        }
    }

    fn opt_number(&mut self, pos: usize, key: &str) -> Result<Option<Number>> {
        match self.take(pos, key) {
            None | Some(Value::None) => Ok(None),
            Some(v) => Number::of(&v, key).map(Some),
        }
    }

    fn opt_dtype(&mut self, pos: usize, key: &str) -> Result<Option<Kind>> {
        match self.take(pos, key) {
            None | Some(Value::None) => Ok(None),
            Some(Value::Dtype(k)) => Ok(Some(k)),
            Some(other) => Err(bad(format!(
                "`{key}` must be a dtype, got {}",
                other.describe()
            ))),
        }
    }

    /// Dimensions given as one int, a list or tuple of ints, or absent (`None`).
    fn opt_dims(&mut self, pos: usize, key: &str) -> Result<Option<Vec<i64>>> {
        match self.take(pos, key) {
            None | Some(Value::None) => Ok(None),
            Some(Value::Seq(items, _)) => items
                .iter()
                .map(|v| int_of(v, key))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Ok(Some(vec![int_of(&v, key)?])),
        }
    }

    /// Dimensions given as one int or a list or tuple of ints (required).
    fn dims(&mut self, pos: usize, key: &str) -> Result<Vec<i64>> {
        self.opt_dims(pos, key)?
            .ok_or_else(|| bad(format!("missing argument `{key}`")))
    }

    /// A size given as varargs from `pos` on (`view(2, 3)`) or as one sequence (`view((2, 3))`),
    /// or as keyword `key`.
    fn sizes(&mut self, pos: usize, key: &str) -> Result<Vec<i64>> {
        let mut rest: Vec<Value> = Vec::new();
        for slot in self.args.iter_mut().skip(pos) {
            if let Some(v) = slot.take() {
                rest.push(v);
            }
        }
        if rest.is_empty() {
            if let Some(v) = self.take(usize::MAX, key) {
                rest.push(v);
            }
        }
        match rest.as_slice() {
            [Value::Seq(items, _)] => items.iter().map(|v| int_of(v, key)).collect(),
            _ => rest.iter().map(|v| int_of(v, key)).collect(),
        }
    }

    /// Tensors given as one list or tuple.
    fn tensors(&mut self, pos: usize, key: &str) -> Result<Vec<Tensor>> {
        match self.required(pos, key)? {
            Value::Seq(items, _) => items
                .into_iter()
                .map(|v| match v {
                    Value::Tensor(t) => Ok(t),
                    other => Err(bad(format!(
                        "`{key}` must hold tensors, got {}",
                        other.describe()
                    ))),
                })
                .collect(),
            other => Err(bad(format!(
                "`{key}` must be a list of tensors, got {}",
                other.describe()
            ))),
        }
    }

    /// Ignores a keyword the loss may pass with no effect here (`device`, `layout`, ...).
    fn ignore(&mut self, key: &str) {
        let _ = self.take(usize::MAX, key);
    }

    fn finish(self) -> Result<()> {
        if let Some(pos) = self.args.iter().position(Option::is_some) {
            return Err(bad(format!("unexpected positional argument {pos}")));
        }
        if let Some((k, _)) = self.kwargs.iter().find(|(_, v)| v.is_some()) {
            return Err(bad(format!("unexpected keyword argument `{k}`")));
        }
        Ok(())
    }
}

fn int_of(v: &Value, key: &str) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(i64::from(*b)),
        other => Err(bad(format!(
            "`{key}` must be an int, got {}",
            other.describe()
        ))),
    }
}

/// A Python number.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Number {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Number {
    fn of(v: &Value, key: &str) -> Result<Number> {
        match v {
            Value::Int(i) => Ok(Number::Int(*i)),
            Value::Float(f) => Ok(Number::Float(*f)),
            Value::Bool(b) => Ok(Number::Bool(*b)),
            other => Err(bad(format!(
                "`{key}` must be a number, got {}",
                other.describe()
            ))),
        }
    }

    fn scalar(self) -> Scalar {
        match self {
            Number::Int(i) => Scalar::int(i),
            Number::Float(f) => Scalar::float(f),
            Number::Bool(b) => Scalar::int(i64::from(b)),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
            Number::Bool(b) => f64::from(u8::from(b)),
        }
    }

    fn value(self) -> Value {
        match self {
            Number::Int(i) => Value::Int(i),
            Number::Float(f) => Value::Float(f),
            Number::Bool(b) => Value::Bool(b),
        }
    }
}

/// The numbers of `torch.tensor`'s or `new_tensor`'s `data`: one number or a list of them.
fn numbers_of(data: &Value) -> Result<Vec<Number>> {
    match data {
        Value::Seq(items, _) => items.iter().map(|v| Number::of(v, "data")).collect(),
        v => Ok(vec![Number::of(v, "data")?]),
    }
}

/// A tensor or a Python number, as an operand of arithmetic.
enum Operand {
    T(Tensor),
    N(Number),
}

impl Operand {
    fn of(v: Value, key: &str) -> Result<Operand> {
        match v {
            Value::Tensor(t) => Ok(Operand::T(t)),
            other => Number::of(&other, key).map(Operand::N),
        }
    }
}

/// Bounds what an operation will create before it runs: the broadcast size of its tensor
/// operands (elementwise ops, `where`, comparisons) or the sum of a list's (`cat`, `stack`).
fn precheck(args: &[Value], kwargs: &[(String, Value)]) -> Result<()> {
    let mut shapes: Vec<Vec<i64>> = Vec::new();
    let mut listed: i64 = 0;
    for v in args.iter().chain(kwargs.iter().map(|(_, v)| v)) {
        match v {
            Value::Tensor(t) => shapes.push(t.size()),
            Value::Seq(items, _) => {
                for item in items {
                    if let Value::Tensor(t) = item {
                        listed = listed.saturating_add(t.numel() as i64);
                    }
                }
            }
            _ => {}
        }
    }
    check_elements(broadcast_numel(&shapes).max(listed), "this operation")
}

/// Runs `callee` on its resolved arguments, within the evaluation's work budget.
pub fn call(callee: &Callee, args: Vec<Value>, kwargs: Vec<(String, Value)>) -> Result<Value> {
    precheck(&args, &kwargs)?;
    let value = match callee {
        Callee::Function(name) => tensor_op(name, false, Call::new(args, kwargs))?,
        Callee::Method(name) => tensor_op(name, true, Call::new(args, kwargs))?,
        Callee::Operator(name) => operator(name, Call::new(args, kwargs))?,
        Callee::Math(name) => math(name, Call::new(args, kwargs))?,
        Callee::GetAttr => get_attr(Call::new(args, kwargs))?,
    };
    if let Value::Tensor(t) = &value {
        check_elements(t.numel() as i64, "this operation")?;
        charge(t.numel() as i64, "this operation")?;
    }
    Ok(value)
}

fn tensor(t: Tensor) -> Result<Value> {
    Ok(Value::Tensor(t))
}

/// Arithmetic and comparison of two operands with PyTorch's semantics for tensors and
/// Python's for two numbers.
fn binary(name: &str, a: Operand, b: Operand) -> Result<Value> {
    use Operand::{N, T};
    fn flipped(n: &str) -> &str {
        match n {
            "lt" => "gt",
            "le" => "ge",
            "gt" => "lt",
            "ge" => "le",
            other => other,
        }
    }
    match (a, b) {
        (T(x), T(y)) => tensor(match name {
            "add" => x.f_add(&y)?,
            "sub" => x.f_sub(&y)?,
            "mul" => x.f_mul(&y)?,
            "div" => x.f_div(&y)?,
            "floordiv" => x.f_floor_divide(&y)?,
            "mod" => x.f_remainder_tensor(&y)?,
            "pow" => x.f_pow(&y)?,
            "minimum" => x.f_minimum(&y)?,
            "maximum" => x.f_maximum(&y)?,
            "fmin" => x.f_fmin(&y)?,
            "fmax" => x.f_fmax(&y)?,
            "eq" => x.f_eq_tensor(&y)?,
            "ne" => x.f_ne_tensor(&y)?,
            "lt" => x.f_lt_tensor(&y)?,
            "le" => x.f_le_tensor(&y)?,
            "gt" => x.f_gt_tensor(&y)?,
            "ge" => x.f_ge_tensor(&y)?,
            "and" => x.f_logical_and(&y)?,
            "or" => x.f_logical_or(&y)?,
            "xor" => x.f_logical_xor(&y)?,
            "bitand" => x.f_bitwise_and_tensor(&y)?,
            "bitor" => x.f_bitwise_or_tensor(&y)?,
            "bitxor" => x.f_bitwise_xor_tensor(&y)?,
            "xlogy" => x.f_xlogy(&y)?,
            "logaddexp" => x.f_logaddexp(&y)?,
            "matmul" => {
                check_matmul(&x, &y)?;
                x.f_matmul(&y)?
            }
            other => return Err(bad(format!("`{other}` needs other operands"))),
        }),
        (T(x), N(n)) => {
            let s = n.scalar();
            tensor(match name {
                "add" => x.f_add_scalar(s)?,
                "sub" => x.f_sub_scalar(s)?,
                "mul" => x.f_mul_scalar(s)?,
                "div" => x.f_div_scalar(s)?,
                "floordiv" => x.f_floor_divide_scalar(s)?,
                "mod" => x.f_remainder(s)?,
                "pow" => x.f_pow_tensor_scalar(s)?,
                "eq" => x.f_eq(s)?,
                "ne" => x.f_ne(s)?,
                "lt" => x.f_lt(s)?,
                "le" => x.f_le(s)?,
                "gt" => x.f_gt(s)?,
                "ge" => x.f_ge(s)?,
                "bitand" => x.f_bitwise_and(s)?,
                "bitor" => x.f_bitwise_or(s)?,
                "bitxor" => x.f_bitwise_xor(s)?,
                "xlogy" => x.f_xlogy_scalar_other(s)?,
                "rsub" => x.f_rsub_scalar(s)?,
                _ => return binary(name, T(x.shallow_clone()), T(scalar_like(n, &x)?)),
            })
        }
        (N(n), T(x)) => {
            let s = n.scalar();
            tensor(match name {
                "add" => x.f_add_scalar(s)?,
                "mul" => x.f_mul_scalar(s)?,
                // Python's `a - x` on a tensor is `torch.rsub(x, a)`; `a / x` is
                // `x.reciprocal() * a` (torch/_tensor.py's __rtruediv__).
                "sub" => x.f_rsub_scalar(s)?,
                "div" => x.f_reciprocal()?.f_mul_scalar(s)?,
                "pow" => Tensor::f_pow_scalar(s, &x)?,
                "eq" | "ne" | "lt" | "le" | "gt" | "ge" => {
                    return binary(flipped(name), T(x), N(n));
                }
                _ => return binary(name, T(scalar_like(n, &x)?), T(x)),
            })
        }
        (N(x), N(y)) => python_binary(name, x, y),
    }
}

/// Most multiply-adds one `matmul` of a custom loss may take (about a second of one core): a
/// loss over logprobs needs far fewer, and a tenant's loss must not hold a worker for minutes.
pub const MAX_MATMUL_WORK: i64 = 1 << 32;

fn check_matmul(x: &Tensor, y: &Tensor) -> Result<()> {
    let inner = x.size().last().copied().unwrap_or(1).max(1);
    let work = (x.numel() as i64).saturating_mul(y.numel() as i64 / inner);
    check_elements(work / inner, "this matmul")?;
    charge(work, "this matmul")?;
    if work > MAX_MATMUL_WORK {
        return Err(bad(format!(
            "a matmul of {:?} and {:?} is too large for a loss (at most {MAX_MATMUL_WORK} multiply-adds)",
            x.size(),
            y.size()
        )));
    }
    Ok(())
}

/// A number as a 0-dim tensor that promotes as a Python scalar would next to `like`.
fn scalar_like(n: Number, like: &Tensor) -> Result<Tensor> {
    let kind = match n {
        Number::Float(_) if !like.is_floating_point() => Kind::Float,
        Number::Bool(_) | Number::Int(_) | Number::Float(_) => like.kind(),
    };
    Ok(Tensor::f_scalar_tensor(n.scalar(), (kind, like.device()))?)
}

/// Python arithmetic of two numbers (a shape's sizes, constants).
fn python_binary(name: &str, x: Number, y: Number) -> Result<Value> {
    use Number::Float;
    let int = |n: Number| match n {
        Number::Int(i) => i,
        Number::Bool(b) => i64::from(b),
        Number::Float(f) => f as i64,
    };
    let ints = match (x, y) {
        (Float(_), _) | (_, Float(_)) => None,
        _ => Some((int(x), int(y))),
    };
    let (a, b) = (x.as_f64(), y.as_f64());
    Ok(match (name, ints) {
        ("add", Some((p, q))) => Value::Int(p.checked_add(q).ok_or_else(|| bad("overflow"))?),
        ("sub", Some((p, q))) => Value::Int(p.checked_sub(q).ok_or_else(|| bad("overflow"))?),
        ("mul", Some((p, q))) => Value::Int(p.checked_mul(q).ok_or_else(|| bad("overflow"))?),
        ("floordiv", Some((_, 0))) | ("mod", Some((_, 0))) => {
            return Err(bad("integer division by zero"))
        }
        ("floordiv", Some((p, q))) => {
            let quotient = p.checked_div(q).ok_or_else(|| bad("overflow"))?;
            let inexact = p.checked_rem(q).ok_or_else(|| bad("overflow"))? != 0;
            Value::Int(if inexact && ((p < 0) != (q < 0)) {
                quotient - 1
            } else {
                quotient
            })
        }
        ("mod", Some((p, q))) => {
            let r = p.checked_rem(q).ok_or_else(|| bad("overflow"))?;
            Value::Int(if r != 0 && ((r < 0) != (q < 0)) {
                r + q
            } else {
                r
            })
        }
        ("pow", Some((p, q))) if q >= 0 => Value::Int(
            p.checked_pow(u32::try_from(q).map_err(|_| bad("overflow"))?)
                .ok_or_else(|| bad("overflow"))?,
        ),
        ("add", None) => Value::Float(a + b),
        ("sub", None) => Value::Float(a - b),
        ("mul", None) => Value::Float(a * b),
        ("div", _) if b == 0.0 => return Err(bad("division by zero")),
        ("div", _) => Value::Float(a / b),
        ("floordiv", None) => Value::Float((a / b).floor()),
        ("mod", None) => Value::Float(a - b * (a / b).floor()),
        ("pow", _) => Value::Float(a.powf(b)),
        ("minimum", _) | ("maximum", _) => return Err(bad(format!("torch.{name} needs tensors"))),
        ("eq", _) => Value::Bool(a == b),
        ("ne", _) => Value::Bool(a != b),
        ("lt", _) => Value::Bool(a < b),
        ("le", _) => Value::Bool(a <= b),
        ("gt", _) => Value::Bool(a > b),
        ("ge", _) => Value::Bool(a >= b),
        (other, _) => return Err(bad(format!("`{other}` is not defined on two numbers"))),
    })
}

fn operator(name: &str, mut c: Call) -> Result<Value> {
    let value = match name {
        "neg" | "pos" | "abs" | "invert" | "not_" => {
            let v = c.required(0, "a")?;
            match (name, v) {
                ("neg", Value::Tensor(t)) => tensor(t.f_neg()?)?,
                ("pos", Value::Tensor(t)) => Value::Tensor(t),
                ("abs", Value::Tensor(t)) => tensor(t.f_abs()?)?,
                ("invert", Value::Tensor(t)) if t.kind() == Kind::Bool => {
                    tensor(t.f_logical_not()?)?
                }
                ("invert", Value::Tensor(t)) => tensor(t.f_bitwise_not()?)?,
                ("neg", v) => match Number::of(&v, "a")? {
                    Number::Float(f) => Value::Float(-f),
                    Number::Int(i) => Value::Int(i.checked_neg().ok_or_else(|| bad("overflow"))?),
                    Number::Bool(b) => Value::Int(-i64::from(b)),
                },
                ("pos", v) => Number::of(&v, "a")?.value(),
                ("abs", v) => match Number::of(&v, "a")? {
                    Number::Float(f) => Value::Float(f.abs()),
                    Number::Int(i) => Value::Int(i.checked_abs().ok_or_else(|| bad("overflow"))?),
                    Number::Bool(b) => Value::Int(i64::from(b)),
                },
                (_, v) => return Err(bad(format!("operator.{name} of {}", v.describe()))),
            }
        }
        "getitem" => {
            let target = c.required(0, "a")?;
            let index = c.required(1, "b")?;
            get_item(target, index)?
        }
        _ => {
            let a = c.operand(0, "a")?;
            let b = c.operand(1, "b")?;
            let op = match name {
                "truediv" => "div",
                "and_" => "bitand",
                "or_" => "bitor",
                "xor" => "bitxor",
                other => other,
            };
            // A bool tensor with a Python bool stays bool, as in PyTorch (libtorch's bitwise ops
            // on two bool tensors are logical already).
            let bool_tensor = |o: &Operand| matches!(o, Operand::T(t) if t.kind() == Kind::Bool);
            let py_bool = |o: &Operand| matches!(o, Operand::N(Number::Bool(_)));
            let logical = (bool_tensor(&a) && py_bool(&b)) || (py_bool(&a) && bool_tensor(&b));
            let op = match op {
                "bitand" if logical => "and",
                "bitor" if logical => "or",
                "bitxor" if logical => "xor",
                other => other,
            };
            binary(op, a, b)?
        }
    };
    c.finish()?;
    Ok(value)
}

fn math(name: &str, mut c: Call) -> Result<Value> {
    let x = Number::of(&c.required(0, "x")?, "x")?.as_f64();
    c.finish()?;
    let domain = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(bad(format!("math.{name}: math domain error")))
        }
    };
    Ok(match name {
        "log" => {
            domain(x > 0.0)?;
            Value::Float(x.ln())
        }
        "log2" => {
            domain(x > 0.0)?;
            Value::Float(x.log2())
        }
        "log10" => {
            domain(x > 0.0)?;
            Value::Float(x.log10())
        }
        "log1p" => {
            domain(x > -1.0)?;
            Value::Float(x.ln_1p())
        }
        "exp" => Value::Float(x.exp()),
        "sqrt" => {
            domain(x >= 0.0)?;
            Value::Float(x.sqrt())
        }
        "floor" => Value::Int(x.floor() as i64),
        "ceil" => Value::Int(x.ceil() as i64),
        other => return Err(bad(format!("math.{other} is not supported"))),
    })
}

fn shape_of(t: &Tensor) -> Value {
    Value::Seq(t.size().into_iter().map(Value::Int).collect(), true)
}

fn get_attr(mut c: Call) -> Result<Value> {
    let target = c.required(0, "obj")?;
    let name = match c.required(1, "name")? {
        Value::Str(s) => s,
        other => {
            return Err(bad(format!(
                "getattr needs a name, got {}",
                other.describe()
            )))
        }
    };
    c.finish()?;
    if !ATTRIBUTES.contains(&name.as_str()) {
        return Err(bad(format!("attribute `{name}` is not supported")));
    }
    match (target, name.as_str()) {
        (Value::Tensor(t), "shape") => Ok(shape_of(&t)),
        (Value::Tensor(t), "dtype") => Ok(Value::Dtype(t.kind())),
        (Value::Tensor(t), "ndim") => Ok(Value::Int(t.dim() as i64)),
        (Value::Tensor(t), "T") | (Value::Tensor(t), "mT") if t.dim() == 2 => {
            tensor(t.f_transpose(0, 1)?)
        }
        (Value::Tensor(_), "device") => Ok(Value::Device),
        (Value::ValuesIndices(v, _), "values") => Ok(Value::Tensor(v)),
        (Value::ValuesIndices(_, i), "indices") => Ok(Value::Tensor(i)),
        (other, name) => Err(bad(format!(
            "{} has no attribute `{name}` here",
            other.describe()
        ))),
    }
}

/// `target[index]` for a tensor, a sequence (a shape) or a `(values, indices)` pair.
fn get_item(target: Value, index: Value) -> Result<Value> {
    match target {
        Value::Tensor(t) => tensor(index_tensor(&t, index)?),
        Value::Seq(items, tuple) => match index {
            Value::Int(i) => {
                let n = items.len() as i64;
                let at = if i < 0 { i + n } else { i };
                if !(0..n).contains(&at) {
                    return Err(bad(format!("index {i} is out of range for length {n}")));
                }
                Ok(items[at as usize].dup())
            }
            Value::Slice(start, stop, step) => {
                let n = items.len() as i64;
                let step = step.unwrap_or(1);
                if step != 1 {
                    return Err(bad("only step 1 slices of a sequence are supported"));
                }
                let clamp = |i: i64| (if i < 0 { i + n } else { i }).clamp(0, n);
                let (a, b) = (clamp(start.unwrap_or(0)), clamp(stop.unwrap_or(n)));
                Ok(Value::Seq(
                    items[a as usize..(b.max(a)) as usize]
                        .iter()
                        .map(Value::dup)
                        .collect(),
                    tuple,
                ))
            }
            other => Err(bad(format!(
                "a sequence cannot be indexed by {}",
                other.describe()
            ))),
        },
        Value::ValuesIndices(v, i) => match index {
            Value::Int(0) => Ok(Value::Tensor(v)),
            Value::Int(1) => Ok(Value::Tensor(i)),
            _ => Err(bad("a (values, indices) pair is indexed by 0 or 1")),
        },
        other => Err(bad(format!("{} cannot be indexed", other.describe()))),
    }
}

/// Tensor indexing: ints, slices, `None` and `...` (basic indexing, a view), or tensors
/// (boolean masks and index tensors) alongside full slices.
fn index_tensor(t: &Tensor, index: Value) -> Result<Tensor> {
    let items = match index {
        Value::Seq(items, true) => items,
        other => vec![other],
    };
    if items
        .iter()
        .any(|v| matches!(v, Value::Tensor(_) | Value::Seq(..)))
    {
        // Advanced indexing: tensors (or lists of ints) per dimension, full slices elsewhere.
        let mut indices: Vec<Option<Tensor>> = Vec::new();
        let explicit = items
            .iter()
            .filter(|v| !matches!(v, Value::Ellipsis))
            .count();
        for item in items {
            match item {
                Value::Tensor(i) => indices.push(Some(i)),
                Value::Seq(list, false)
                    if !list.is_empty() && list.iter().all(|v| matches!(v, Value::Bool(_))) =>
                {
                    let mask: Vec<bool> = list
                        .iter()
                        .map(|v| matches!(v, Value::Bool(true)))
                        .collect();
                    indices.push(Some(Tensor::from_slice(&mask)));
                }
                Value::Seq(list, false) => {
                    let ints = list
                        .iter()
                        .map(|v| int_of(v, "index"))
                        .collect::<Result<Vec<_>>>()?;
                    indices.push(Some(Tensor::from_slice(&ints)));
                }
                Value::Slice(None, None, None) => indices.push(None),
                Value::Ellipsis => {
                    let fill = (t.dim()).saturating_sub(explicit);
                    indices.extend((0..fill).map(|_| None));
                }
                other => {
                    return Err(bad(format!(
                        "indexing with tensors together with {} is not supported",
                        other.describe()
                    )))
                }
            }
        }
        let index_shapes: Vec<Vec<i64>> = indices.iter().flatten().map(Tensor::size).collect();
        let size = t.size();
        let rest = size
            .iter()
            .enumerate()
            .filter(|(i, _)| !matches!(indices.get(*i), Some(Some(_))))
            .fold(1i64, |acc, (_, d)| acc.saturating_mul(*d));
        check_elements(
            broadcast_numel(&index_shapes).saturating_mul(rest),
            "this indexing",
        )?;
        return Ok(t.f_index(&indices)?);
    }
    let explicit = items
        .iter()
        .filter(|v| !matches!(v, Value::Ellipsis | Value::None))
        .count();
    let mut out = t.shallow_clone();
    let mut dim: i64 = 0;
    for item in items {
        match item {
            Value::Int(i) => out = out.f_select(dim, i)?,
            Value::Slice(start, stop, step) => {
                let step = step.unwrap_or(1);
                if step <= 0 {
                    return Err(bad("slice steps must be positive"));
                }
                out = out.f_slice(dim, start, stop, step)?;
                dim += 1;
            }
            Value::None => {
                out = out.f_unsqueeze(dim)?;
                dim += 1;
            }
            Value::Ellipsis => dim += t.dim() as i64 - explicit as i64,
            other => {
                return Err(bad(format!(
                    "a tensor cannot be indexed by {}",
                    other.describe()
                )))
            }
        }
    }
    Ok(out)
}

fn unary(name: &str, x: &Tensor) -> Result<Option<Tensor>> {
    Ok(Some(match name {
        "exp" => x.f_exp()?,
        "exp2" => x.f_exp2()?,
        "expm1" => x.f_expm1()?,
        "log" => x.f_log()?,
        "log1p" => x.f_log1p()?,
        "log2" => x.f_log2()?,
        "log10" => x.f_log10()?,
        "sigmoid" | "expit" => x.f_sigmoid()?,
        "tanh" => x.f_tanh()?,
        "relu" => x.f_relu()?,
        "abs" => x.f_abs()?,
        "neg" | "negative" => x.f_neg()?,
        "sqrt" => x.f_sqrt()?,
        "rsqrt" => x.f_rsqrt()?,
        "square" => x.f_square()?,
        "sign" => x.f_sign()?,
        "floor" => x.f_floor()?,
        "ceil" => x.f_ceil()?,
        "round" => x.f_round()?,
        "trunc" => x.f_trunc()?,
        "reciprocal" => x.f_reciprocal()?,
        "sin" => x.f_sin()?,
        "cos" => x.f_cos()?,
        "erf" => x.f_erf()?,
        "logical_not" => x.f_logical_not()?,
        "isnan" => x.f_isnan()?,
        "isinf" => x.f_isinf()?,
        "isfinite" => x.f_isfinite()?,
        "detach" => x.f_detach()?,
        "log_sigmoid" | "logsigmoid" => x.f_log_sigmoid()?,
        "silu" => x.f_silu()?,
        "contiguous" => x.f_contiguous()?,
        "clone" => x.copy(),
        "t" if x.dim() < 2 => x.shallow_clone(),
        "t" => x.f_transpose(0, 1)?,
        "float" => x.f_to_kind(Kind::Float)?,
        "double" => x.f_to_kind(Kind::Double)?,
        "half" => x.f_to_kind(Kind::Half)?,
        "bfloat16" => x.f_to_kind(Kind::BFloat16)?,
        "long" => x.f_to_kind(Kind::Int64)?,
        "int" => x.f_to_kind(Kind::Int)?,
        "bool" => x.f_to_kind(Kind::Bool)?,
        _ => return Ok(None),
    }))
}

fn creation_kind(c: &mut Call, default: Kind) -> Result<Kind> {
    let kind = c.opt_dtype(usize::MAX, "dtype")?.unwrap_or(default);
    for key in [
        "device",
        "layout",
        "requires_grad",
        "pin_memory",
        "memory_format",
    ] {
        c.ignore(key);
    }
    Ok(kind)
}

fn checked_size(size: &[i64]) -> Result<Vec<i64>> {
    let mut total: i64 = 1;
    for &s in size {
        if s < 0 {
            return Err(bad(format!("negative size {s}")));
        }
        total = total.saturating_mul(s);
    }
    if total > MAX_ELEMENTS {
        return Err(bad(format!(
            "a tensor of {total} elements; at most {MAX_ELEMENTS} are accepted"
        )));
    }
    Ok(size.to_vec())
}

fn tensor_op(name: &str, method: bool, mut c: Call) -> Result<Value> {
    let cpu = tch::Device::Cpu;
    // torch.nn.functional activations are recorded with `inplace=False`.
    match c.take(usize::MAX, "inplace") {
        None | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(bad(
                "in-place operations are not supported in a custom loss",
            ))
        }
    }
    // `x.where(condition, y)` is `torch.where(condition, x, y)`.
    if method && name == "where" && c.args.len() >= 2 {
        c.args.swap(0, 1);
    }
    // Creation from numbers, no tensor first.
    match name {
        "zeros" | "ones" => {
            let size = checked_size(&c.sizes(0, "size")?)?;
            let kind = creation_kind(&mut c, Kind::Float)?;
            c.finish()?;
            return tensor(if name == "zeros" {
                Tensor::f_zeros(size.as_slice(), (kind, cpu))?
            } else {
                Tensor::f_ones(size.as_slice(), (kind, cpu))?
            });
        }
        "full" => {
            let size = checked_size(&c.dims(0, "size")?)?;
            let fill = Number::of(&c.required(1, "fill_value")?, "fill_value")?;
            let default = match fill {
                Number::Float(_) => Kind::Float,
                Number::Int(_) => Kind::Int64,
                Number::Bool(_) => Kind::Bool,
            };
            let kind = creation_kind(&mut c, default)?;
            c.finish()?;
            return tensor(Tensor::f_full(size.as_slice(), fill.scalar(), (kind, cpu))?);
        }
        "arange" => {
            let a = c.opt_number(0, "start")?;
            let b = c.opt_number(1, "end")?;
            let s = c.opt_number(2, "step")?;
            let (start, end, step) = match (a, b, s) {
                (Some(end), None, None) => (Number::Int(0), end, Number::Int(1)),
                (Some(start), Some(end), step) => (start, end, step.unwrap_or(Number::Int(1))),
                _ => return Err(bad("arange needs an end")),
            };
            let float = [start, end, step]
                .iter()
                .any(|n| matches!(n, Number::Float(_)));
            let span = (end.as_f64() - start.as_f64()) / step.as_f64();
            if !span.is_finite() || span > MAX_ELEMENTS as f64 {
                return Err(bad("arange would make too many elements"));
            }
            let kind = creation_kind(&mut c, if float { Kind::Float } else { Kind::Int64 })?;
            c.finish()?;
            return tensor(Tensor::f_arange_start_step(
                start.scalar(),
                end.scalar(),
                step.scalar(),
                (kind, cpu),
            )?);
        }
        "tensor" | "scalar_tensor" => {
            let data = c.required(0, "data")?;
            let numbers = numbers_of(&data)?;
            let default = if numbers.iter().any(|n| matches!(n, Number::Float(_)))
                || name == "scalar_tensor"
            {
                Kind::Float
            } else if numbers.iter().all(|n| matches!(n, Number::Bool(_))) && !numbers.is_empty() {
                Kind::Bool
            } else {
                Kind::Int64
            };
            let kind = creation_kind(&mut c, default)?;
            c.finish()?;
            let values: Vec<f64> = numbers.iter().map(|n| n.as_f64()).collect();
            let t = Tensor::from_slice(&values).f_to_kind(kind)?;
            return tensor(match data {
                Value::Seq(..) => t,
                _ => t.f_reshape([])?,
            });
        }
        "stack" | "cat" | "concat" => {
            let tensors = c.tensors(0, "tensors")?;
            let dim = c.opt_int(1, "dim")?.unwrap_or(0);
            c.finish()?;
            return tensor(if name == "stack" {
                Tensor::f_stack(&tensors, dim)?
            } else {
                Tensor::f_cat(&tensors, dim)?
            });
        }
        "where" => {
            let cond = c.tensor(0, "condition")?;
            let a = c.operand(1, "input")?;
            let b = c.operand(2, "other")?;
            c.finish()?;
            return tensor(match (a, b) {
                (Operand::T(x), Operand::T(y)) => x.f_where_self(&cond, &y)?,
                (Operand::T(x), Operand::N(n)) => x.f_where_scalarother(&cond, n.scalar())?,
                (Operand::N(n), Operand::T(y)) => {
                    Tensor::f_where_scalarself(&cond, n.scalar(), &y)?
                }
                (Operand::N(n), Operand::N(m)) => {
                    let kind = if [n, m].iter().any(|v| matches!(v, Number::Float(_))) {
                        Kind::Float
                    } else {
                        Kind::Int64
                    };
                    let x = Tensor::f_scalar_tensor(n.scalar(), (kind, cpu))?;
                    let y = Tensor::f_scalar_tensor(m.scalar(), (kind, cpu))?;
                    x.f_where_self(&cond, &y)?
                }
            });
        }
        _ => {}
    }
    // Two operands, either of which may be a number.
    let two = |n: &str| -> Option<&'static str> {
        Some(match n {
            "add" => "add",
            "sub" | "subtract" => "sub",
            "mul" | "multiply" => "mul",
            "div" | "divide" | "true_divide" => "div",
            "pow" => "pow",
            "minimum" => "minimum",
            "maximum" => "maximum",
            "fmin" => "fmin",
            "fmax" => "fmax",
            "eq" => "eq",
            "ne" => "ne",
            "lt" => "lt",
            "le" => "le",
            "gt" => "gt",
            "ge" => "ge",
            "logical_and" => "and",
            "logical_or" => "or",
            "logical_xor" => "xor",
            "xlogy" => "xlogy",
            "logaddexp" => "logaddexp",
            "matmul" | "dot" => "matmul",
            "rsub" => "rsub",
            _ => return None,
        })
    };
    if let Some(op) = two(name) {
        let a = c.operand(0, "input")?;
        let b = c.operand(
            1,
            match name {
                "pow" => "exponent",
                "dot" => "tensor",
                _ => "other",
            },
        )?;
        let alpha = c.opt_number(2, "alpha")?;
        if name == "div" || name == "divide" {
            if let Some(Value::Str(mode)) = c.take(usize::MAX, "rounding_mode") {
                return Err(bad(format!(
                    "div's rounding_mode `{mode}` is not supported"
                )));
            }
        }
        c.finish()?;
        let b = match alpha {
            None => b,
            Some(alpha) => match (op, b) {
                ("add" | "sub", Operand::T(y)) => Operand::T(y.f_mul_scalar(alpha.scalar())?),
                ("add" | "sub", Operand::N(n)) => {
                    Operand::N(match python_binary("mul", n, alpha)? {
                        Value::Int(i) => Number::Int(i),
                        Value::Float(f) => Number::Float(f),
                        _ => n,
                    })
                }
                _ => return Err(bad(format!("`{name}` takes no alpha"))),
            },
        };
        if op == "rsub" {
            return match (a, b) {
                (Operand::T(x), Operand::T(y)) => tensor(y.f_sub(&x)?),
                (a, b) => binary("rsub", a, b),
            };
        }
        return binary(op, a, b);
    }
    // Everything else has a tensor first.
    let x = c.tensor(0, if name == "to" { "self" } else { "input" })?;
    if let Some(t) = unary(name, &x)? {
        c.finish()?;
        return tensor(t);
    }
    let value = match name {
        "softplus" => {
            let beta = c.opt_number(1, "beta")?.map(Number::as_f64).unwrap_or(1.0);
            let threshold = c
                .opt_number(2, "threshold")?
                .map(Number::as_f64)
                .unwrap_or(20.0);
            if threshold != 20.0 {
                return Err(bad("softplus supports the default threshold (20) only"));
            }
            if beta == 1.0 {
                tensor(x.f_softplus()?)?
            } else {
                tensor(x.f_mul_scalar(beta)?.f_softplus()?.f_div_scalar(beta)?)?
            }
        }
        "gelu" => {
            let approximate = match c.take(1, "approximate") {
                None => "none".to_string(),
                Some(Value::Str(s)) => s,
                Some(other) => {
                    return Err(bad(format!(
                        "`approximate` must be a string, got {}",
                        other.describe()
                    )))
                }
            };
            tensor(x.f_gelu(&approximate)?)?
        }
        "elu" => {
            let alpha = c.opt_number(1, "alpha")?.map(Number::as_f64).unwrap_or(1.0);
            if alpha != 1.0 {
                return Err(bad("elu supports alpha 1 only"));
            }
            tensor(x.f_elu()?)?
        }
        "nan_to_num" => {
            let nan = c.opt_number(1, "nan")?.map(Number::as_f64);
            let posinf = c.opt_number(2, "posinf")?.map(Number::as_f64);
            let neginf = c.opt_number(3, "neginf")?.map(Number::as_f64);
            tensor(x.f_nan_to_num(nan, posinf, neginf)?)?
        }
        "clamp" | "clip" => {
            let lo = c.take(1, "min");
            let hi = c.take(2, "max");
            let is_tensor = |v: &Option<Value>| matches!(v, Some(Value::Tensor(_)));
            if is_tensor(&lo) || is_tensor(&hi) {
                let as_tensor = |v: Option<Value>| -> Result<Option<Tensor>> {
                    match v {
                        None | Some(Value::None) => Ok(None),
                        Some(Value::Tensor(t)) => Ok(Some(t)),
                        Some(other) => Ok(Some(scalar_like(Number::of(&other, "min")?, &x)?)),
                    }
                };
                tensor(x.f_clamp_tensor(as_tensor(lo)?, as_tensor(hi)?)?)?
            } else {
                let num = |v: Option<Value>, key: &str| -> Result<Option<Number>> {
                    match v {
                        None | Some(Value::None) => Ok(None),
                        Some(v) => Number::of(&v, key).map(Some),
                    }
                };
                match (num(lo, "min")?, num(hi, "max")?) {
                    (Some(a), Some(b)) => tensor(x.f_clamp(a.scalar(), b.scalar())?)?,
                    (Some(a), None) => tensor(x.f_clamp_min(a.scalar())?)?,
                    (None, Some(b)) => tensor(x.f_clamp_max(b.scalar())?)?,
                    (None, None) => return Err(bad("clamp needs min or max")),
                }
            }
        }
        "clamp_min" | "clamp_max" => {
            match c.operand(1, if name == "clamp_min" { "min" } else { "max" })? {
                Operand::N(n) if name == "clamp_min" => tensor(x.f_clamp_min(n.scalar())?)?,
                Operand::N(n) => tensor(x.f_clamp_max(n.scalar())?)?,
                Operand::T(t) if name == "clamp_min" => tensor(x.f_clamp_min_tensor(&t)?)?,
                Operand::T(t) => tensor(x.f_clamp_max_tensor(&t)?)?,
            }
        }
        "masked_fill" => {
            let mask = c.tensor(1, "mask")?;
            match c.operand(2, "value")? {
                Operand::N(n) => tensor(x.f_masked_fill(&mask, n.scalar())?)?,
                Operand::T(t) => tensor(x.f_masked_fill_tensor(&mask, &t)?)?,
            }
        }
        "lerp" => {
            let end = c.tensor(1, "end")?;
            match c.operand(2, "weight")? {
                Operand::N(n) => tensor(x.f_lerp(&end, n.scalar())?)?,
                Operand::T(w) => tensor(x.f_lerp_tensor(&end, &w)?)?,
            }
        }
        "sum" | "mean" | "nansum" => {
            let dims = c.opt_dims(1, "dim")?;
            let keepdim = c.bool_or(2, "keepdim", false)?;
            let dtype = c.opt_dtype(3, "dtype")?;
            tensor(match (name, dims) {
                ("sum", None) => x.f_sum(dtype)?,
                ("sum", Some(d)) => x.f_sum_dim_intlist(d.as_slice(), keepdim, dtype)?,
                (_, None) => x.f_mean(dtype)?,
                (_, Some(d)) => x.f_mean_dim(d.as_slice(), keepdim, dtype)?,
            })?
        }
        "prod" => {
            let dim = c.opt_int(1, "dim")?;
            let keepdim = c.bool_or(2, "keepdim", false)?;
            let dtype = c.opt_dtype(3, "dtype")?;
            tensor(match dim {
                None => x.f_prod(dtype)?,
                Some(d) => x.f_prod_dim_int(d, keepdim, dtype)?,
            })?
        }
        "amax" | "amin" | "logsumexp" => {
            let dims = c.opt_dims(1, "dim")?;
            let keepdim = c.bool_or(2, "keepdim", false)?;
            let dims = match (name, dims) {
                ("logsumexp", None) => return Err(bad("logsumexp needs dim")),
                (_, d) => d.unwrap_or_default(),
            };
            tensor(match name {
                "amax" => x.f_amax(dims.as_slice(), keepdim)?,
                "amin" => x.f_amin(dims.as_slice(), keepdim)?,
                _ => x.f_logsumexp(dims.as_slice(), keepdim)?,
            })?
        }
        "max" | "min" => match c.take(1, "dim") {
            None => {
                if let Some(other) = c.take(usize::MAX, "other") {
                    let other = Operand::of(other, "other")?;
                    binary(
                        if name == "max" { "maximum" } else { "minimum" },
                        Operand::T(x),
                        other,
                    )?
                } else {
                    tensor(if name == "max" {
                        x.f_max()?
                    } else {
                        x.f_min()?
                    })?
                }
            }
            Some(Value::Tensor(other)) => binary(
                if name == "max" { "maximum" } else { "minimum" },
                Operand::T(x),
                Operand::T(other),
            )?,
            Some(dim) => {
                let dim = int_of(&dim, "dim")?;
                let keepdim = c.bool_or(2, "keepdim", false)?;
                let (v, i) = if name == "max" {
                    x.f_max_dim(dim, keepdim)?
                } else {
                    x.f_min_dim(dim, keepdim)?
                };
                Value::ValuesIndices(v, i)
            }
        },
        "std" | "var" => {
            // `x.std(False)`: the first argument is `unbiased` when it is a bool.
            if let Some(Some(Value::Bool(b))) = c.args.get(1).map(|v| v.as_ref().map(Value::dup)) {
                c.args[1] = None;
                c.kwargs.push(("unbiased".into(), Some(Value::Bool(b))));
            }
            let dims = c.opt_dims(1, "dim")?;
            let unbiased = match (c.take(2, "unbiased"), c.take(usize::MAX, "correction")) {
                (None, None) => true,
                (Some(Value::Bool(b)), None) => b,
                (None, Some(Value::Int(1))) => true,
                (None, Some(Value::Int(0))) => false,
                _ => {
                    return Err(bad(format!(
                        "{name} takes unbiased (a bool) or correction 0 or 1"
                    )))
                }
            };
            let keepdim = c.bool_or(3, "keepdim", false)?;
            tensor(match (name, dims) {
                ("std", None) if !keepdim => x.f_std(unbiased)?,
                ("var", None) if !keepdim => x.f_var(unbiased)?,
                ("std", d) => x.f_std_dim(d.as_deref(), unbiased, keepdim)?,
                (_, d) => x.f_var_dim(d.as_deref(), unbiased, keepdim)?,
            })?
        }
        "all" | "any" => {
            if c.take(1, "dim").is_some() {
                return Err(bad(format!(
                    "{name} over a dim is not supported; use it over the whole tensor"
                )));
            }
            tensor(if name == "all" {
                x.f_all()?
            } else {
                x.f_any()?
            })?
        }
        "argmax" | "argmin" => {
            let dim = c.opt_int(1, "dim")?;
            let keepdim = c.bool_or(2, "keepdim", false)?;
            tensor(if name == "argmax" {
                x.f_argmax(dim, keepdim)?
            } else {
                x.f_argmin(dim, keepdim)?
            })?
        }
        "count_nonzero" => {
            let dim = c.opt_int(1, "dim")?;
            tensor(x.f_count_nonzero(dim)?)?
        }
        "cumsum" | "softmax" | "log_softmax" => {
            let dim = c.int(1, "dim")?;
            let dtype = c.opt_dtype(2, "dtype")?;
            c.ignore("_stacklevel");
            tensor(match name {
                "cumsum" => x.f_cumsum(dim, dtype)?,
                "softmax" => x.f_softmax(dim, dtype)?,
                _ => x.f_log_softmax(dim, dtype)?,
            })?
        }
        "view" | "reshape" => {
            if let Some(Value::Dtype(_)) = c.args.get(1).and_then(|v| v.as_ref()) {
                return Err(bad("view(dtype) is not supported"));
            }
            let size = c.sizes(1, if name == "view" { "size" } else { "shape" })?;
            tensor(if name == "view" {
                x.f_view(size.as_slice())?
            } else {
                x.f_reshape(size.as_slice())?
            })?
        }
        "expand" => {
            let size = c.sizes(1, "size")?;
            tensor(x.f_expand(size.as_slice(), false)?)?
        }
        "permute" => {
            let dims = c.sizes(1, "dims")?;
            tensor(x.f_permute(dims.as_slice())?)?
        }
        "unsqueeze" => {
            let d = c.int(1, "dim")?;
            tensor(x.f_unsqueeze(d)?)?
        }
        "squeeze" => match c.opt_dims(1, "dim")? {
            None => tensor(x.f_squeeze()?)?,
            Some(dims) => {
                let mut out = x;
                let mut dims: Vec<i64> = dims
                    .iter()
                    .map(|&d| if d < 0 { d + out.dim() as i64 } else { d })
                    .collect();
                dims.sort_unstable_by(|a, b| b.cmp(a));
                for d in dims {
                    out = out.f_squeeze_dim(d)?;
                }
                tensor(out)?
            }
        },
        "flatten" => {
            let start = c.opt_int(1, "start_dim")?.unwrap_or(0);
            let end = c.opt_int(2, "end_dim")?.unwrap_or(-1);
            tensor(x.f_flatten(start, end)?)?
        }
        "transpose" => {
            let a = c.int(1, "dim0")?;
            let b = c.int(2, "dim1")?;
            tensor(x.f_transpose(a, b)?)?
        }
        "expand_as" | "type_as" => {
            let other = c.tensor(1, "other")?;
            tensor(if name == "expand_as" {
                x.f_expand_as(&other)?
            } else {
                x.f_to_kind(other.kind())?
            })?
        }
        "narrow" => {
            let dim = c.int(1, "dim")?;
            let start = c.int(2, "start")?;
            let length = c.int(3, "length")?;
            tensor(x.f_narrow(dim, start, length)?)?
        }
        "select" => {
            let dim = c.int(1, "dim")?;
            let index = c.int(2, "index")?;
            tensor(x.f_select(dim, index)?)?
        }
        "flip" => {
            let dims = c.sizes(1, "dims")?;
            tensor(x.f_flip(dims.as_slice())?)?
        }
        "gather" | "index_select" => {
            let dim = c.int(1, "dim")?;
            let index = c.tensor(2, "index")?;
            if name == "index_select" {
                let along = x
                    .size()
                    .get(dim.rem_euclid(x.dim().max(1) as i64) as usize)
                    .copied()
                    .unwrap_or(1)
                    .max(1);
                check_elements(
                    (x.numel() as i64 / along).saturating_mul(index.numel() as i64),
                    "this index_select",
                )?;
            }
            tensor(if name == "gather" {
                let _ = c.bool_or(3, "sparse_grad", false)?;
                x.f_gather(dim, &index, false)?
            } else {
                x.f_index_select(dim, &index)?
            })?
        }
        "size" => match c.opt_int(1, "dim")? {
            None => shape_of(&x),
            Some(d) => {
                let n = x.dim() as i64;
                let at = if d < 0 { d + n } else { d };
                if !(0..n).contains(&at) {
                    return Err(bad(format!("dim {d} is out of range for {n} dimensions")));
                }
                Value::Int(x.size()[at as usize])
            }
        },
        "dim" => Value::Int(x.dim() as i64),
        "numel" => Value::Int(x.numel() as i64),
        "to" => {
            let mut kind = None;
            for pos in 1..=2 {
                match c.take(pos, if pos == 1 { "dtype" } else { "_" }) {
                    Some(Value::Dtype(k)) => kind = Some(k),
                    Some(Value::Tensor(t)) => kind = Some(t.kind()),
                    Some(Value::Device | Value::Str(_)) | None => {}
                    Some(other) => return Err(bad(format!("to() of {}", other.describe()))),
                }
            }
            if let Some(Value::Dtype(k)) = c.take(usize::MAX, "dtype") {
                kind = Some(k);
            }
            for key in ["device", "non_blocking", "copy", "memory_format"] {
                c.ignore(key);
            }
            tensor(match kind {
                Some(k) => x.f_to_kind(k)?,
                None => x,
            })?
        }
        "zeros_like" | "ones_like" => {
            let kind = creation_kind(&mut c, x.kind())?;
            let t = if name == "zeros_like" {
                x.f_zeros_like()?
            } else {
                x.f_ones_like()?
            };
            tensor(t.f_to_kind(kind)?)?
        }
        "full_like" => {
            let fill = Number::of(&c.required(1, "fill_value")?, "fill_value")?;
            let kind = creation_kind(&mut c, x.kind())?;
            tensor(Tensor::f_full(
                x.size().as_slice(),
                fill.scalar(),
                (kind, cpu),
            )?)?
        }
        "new_zeros" | "new_ones" => {
            let size = checked_size(&c.sizes(1, "size")?)?;
            let kind = creation_kind(&mut c, x.kind())?;
            tensor(if name == "new_zeros" {
                Tensor::f_zeros(size.as_slice(), (kind, cpu))?
            } else {
                Tensor::f_ones(size.as_slice(), (kind, cpu))?
            })?
        }
        "new_full" => {
            let size = checked_size(&c.dims(1, "size")?)?;
            let fill = Number::of(&c.required(2, "fill_value")?, "fill_value")?;
            let kind = creation_kind(&mut c, x.kind())?;
            tensor(Tensor::f_full(size.as_slice(), fill.scalar(), (kind, cpu))?)?
        }
        "new_tensor" => {
            let data = c.required(1, "data")?;
            let numbers: Vec<f64> = numbers_of(&data)?.into_iter().map(Number::as_f64).collect();
            let kind = creation_kind(&mut c, x.kind())?;
            let t = Tensor::from_slice(&numbers).f_to_kind(kind)?;
            tensor(match data {
                Value::Seq(..) => t,
                _ => t.f_reshape([])?,
            })?
        }
        other => return Err(bad(format!("`{other}` cannot be called this way"))),
    };
    c.finish()?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32]) -> Value {
        Value::Tensor(Tensor::from_slice(values))
    }

    fn floats(v: Value) -> Vec<f32> {
        match v {
            Value::Tensor(t) => {
                Vec::<f32>::try_from(&t.f_to_kind(Kind::Float).unwrap().f_reshape([-1]).unwrap())
                    .unwrap()
            }
            other => panic!("not a tensor: {other:?}"),
        }
    }

    #[test]
    fn python_numbers_on_the_left_follow_torch() {
        let sub = Callee::resolve("call_function", "operator.sub").unwrap();
        assert_eq!(
            floats(call(&sub, vec![Value::Float(1.0), t(&[0.25, 2.0])], vec![]).unwrap()),
            vec![0.75, -1.0]
        );
        let div = Callee::resolve("call_function", "operator.truediv").unwrap();
        assert_eq!(
            floats(call(&div, vec![Value::Int(1), t(&[0.5, 4.0])], vec![]).unwrap()),
            vec![2.0, 0.25]
        );
        let lt = Callee::resolve("call_function", "operator.lt").unwrap();
        assert_eq!(
            floats(call(&lt, vec![Value::Float(1.0), t(&[0.5, 4.0])], vec![]).unwrap()),
            vec![0.0, 1.0]
        );
        // A float32 tensor times a Python float stays float32.
        let mul = Callee::resolve("call_function", "operator.mul").unwrap();
        match call(&mul, vec![t(&[1.0]), Value::Float(0.1)], vec![]).unwrap() {
            Value::Tensor(x) => assert_eq!(x.kind(), Kind::Float),
            other => panic!("{other:?}"),
        }
        // Python arithmetic on sizes.
        assert!(matches!(
            python_binary("floordiv", Number::Int(-7), Number::Int(2)).unwrap(),
            Value::Int(-4)
        ));
        assert!(matches!(
            python_binary("mod", Number::Int(-7), Number::Int(2)).unwrap(),
            Value::Int(1)
        ));
    }

    #[test]
    fn callees_resolve_from_torch_fx_names() {
        for (op, target) in [
            ("call_function", "torch.exp"),
            ("call_function", "torch._C._nn.log_sigmoid"),
            ("call_function", "torch.nn.functional.softplus"),
            ("call_function", "torch.where"),
            ("call_function", "getattr"),
            ("call_function", "math.log"),
            ("call_method", "sum"),
            ("call_method", "new_ones"),
        ] {
            assert!(Callee::resolve(op, target).is_ok(), "{op} {target}");
        }
        for (op, target) in [
            ("call_function", "os.system"),
            ("call_function", "torch.load"),
            ("call_function", "torch.nn.functional.linear.x"),
            ("call_method", "backward"),
            ("call_method", "item"),
            ("call_method", "stack"),
            ("call_function", "builtins.eval"),
        ] {
            assert!(Callee::resolve(op, target).is_err(), "{op} {target}");
        }
    }

    #[test]
    fn signatures_follow_torch() {
        reset_work();
        // `x.where(cond, y)` is `torch.where(cond, x, y)`.
        let wh = Callee::resolve("call_method", "where").unwrap();
        let cond = Value::Tensor(Tensor::from_slice(&[true, false]));
        let out = call(&wh, vec![t(&[1.0, 2.0]), cond, t(&[9.0, 9.0])], vec![]).unwrap();
        assert_eq!(floats(out), vec![1.0, 9.0]);
        // F.relu is recorded with inplace=False.
        let relu = Callee::resolve("call_function", "torch.nn.functional.relu").unwrap();
        let out = call(
            &relu,
            vec![t(&[-1.0, 2.0])],
            vec![("inplace".into(), Value::Bool(false))],
        )
        .unwrap();
        assert_eq!(floats(out), vec![0.0, 2.0]);
        // x.std(False) is the biased estimate over every element.
        let std = Callee::resolve("call_method", "std").unwrap();
        let out = floats(call(&std, vec![t(&[1.0, 3.0]), Value::Bool(false)], vec![]).unwrap());
        assert!((out[0] - 1.0).abs() < 1e-6, "{out:?}");
        // A bool tensor & an int tensor is bitwise (int64), as in PyTorch.
        let and = Callee::resolve("call_function", "operator.and_").unwrap();
        let mask = Value::Tensor(Tensor::from_slice(&[true, true]));
        let ints = Value::Tensor(Tensor::from_slice(&[2i64, 3]));
        match call(&and, vec![mask, ints], vec![]).unwrap() {
            Value::Tensor(x) => assert_eq!(Vec::<i64>::try_from(&x).unwrap(), vec![0, 1]),
            other => panic!("{other:?}"),
        }
        // Integer corner cases are errors, not panics.
        assert!(python_binary("floordiv", Number::Int(i64::MIN), Number::Int(-1)).is_err());
        assert!(python_binary("mod", Number::Int(i64::MIN), Number::Int(-1)).is_err());
    }

    #[test]
    fn a_loss_cannot_create_more_than_its_budget() {
        reset_work();
        let ones = Callee::resolve("call_function", "torch.ones").unwrap();
        let big = call(
            &ones,
            vec![Value::Int(1 << 13), Value::Int(1 << 13)],
            vec![],
        )
        .unwrap();
        let exp = Callee::resolve("call_method", "exp").unwrap();
        let mut err = None;
        for _ in 0..8 {
            if let Err(e) = call(&exp, vec![big.dup()], vec![]) {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("the budget runs out").to_string();
        assert!(err.contains("work one loss may do"), "{err}");
        // Broadcasting to a huge result is refused before it is computed.
        reset_work();
        let column = Value::Tensor(Tensor::zeros([1 << 16, 1], (Kind::Float, tch::Device::Cpu)));
        let row = Value::Tensor(Tensor::zeros([1, 1 << 16], (Kind::Float, tch::Device::Cpu)));
        let add = Callee::resolve("call_function", "operator.add").unwrap();
        let err = call(&add, vec![column, row], vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most"), "{err}");
        reset_work();
    }

    #[test]
    fn indexing_and_shapes() {
        let x =
            Value::Tensor(Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]));
        let getitem = Callee::resolve("call_function", "operator.getitem").unwrap();
        let idx = Value::Seq(
            vec![
                Value::Slice(None, None, None),
                Value::Slice(Some(1), None, None),
            ],
            true,
        );
        assert_eq!(
            floats(call(&getitem, vec![x.dup(), idx], vec![]).unwrap()),
            vec![2.0, 3.0, 5.0, 6.0]
        );
        let idx = Value::Seq(vec![Value::Ellipsis, Value::Int(-1)], true);
        assert_eq!(
            floats(call(&getitem, vec![x.dup(), idx], vec![]).unwrap()),
            vec![3.0, 6.0]
        );
        let getattr = Callee::GetAttr;
        let shape = call(&getattr, vec![x.dup(), Value::Str("shape".into())], vec![]).unwrap();
        assert!(matches!(
            call(&getitem, vec![shape, Value::Int(1)], vec![]).unwrap(),
            Value::Int(3)
        ));
        let max = Callee::resolve("call_method", "max").unwrap();
        let pair = call(&max, vec![x.dup()], vec![("dim".into(), Value::Int(1))]).unwrap();
        let values = call(&getattr, vec![pair, Value::Str("values".into())], vec![]).unwrap();
        assert_eq!(floats(values), vec![3.0, 6.0]);
        let sum = Callee::resolve("call_method", "sum").unwrap();
        let err = call(&sum, vec![x.dup()], vec![("axis".into(), Value::Int(0))]).unwrap_err();
        assert!(err.to_string().contains("axis"), "{err}");
        let ones = Callee::resolve("call_function", "torch.ones").unwrap();
        let big = call(&ones, vec![Value::Int(4096), Value::Int(4096)], vec![]).unwrap();
        let matmul = Callee::resolve("call_function", "operator.matmul").unwrap();
        let err = call(&matmul, vec![big.dup(), big], vec![]).unwrap_err();
        assert!(err.to_string().contains("matmul"), "{err}");
        reset_work();
        let zeros = Callee::resolve("call_function", "torch.zeros").unwrap();
        let err = call(
            &zeros,
            vec![Value::Int(1 << 20), Value::Int(1 << 20)],
            vec![],
        )
        .unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }
}
