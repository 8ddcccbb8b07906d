//! Custom losses uploaded by the SDK's `ServiceClient.create_custom_loss`: a per-datum function
//! of the target log-probabilities (and of named `loss_fn_inputs`) that torch.fx traced on the
//! client and sent as plain data, node by node.
//!
//! Nothing in the upload is executed as code. [`CustomLoss::parse`] rebuilds the graph from a
//! fixed list of operations ([`crate::custom_ops`]): every node's callee must be one of them,
//! every reference must name an earlier node, and the output must be `(loss, {metric: value})`
//! with the SDK's metric names. [`CustomLoss::evaluate`] then runs it on one datum's
//! log-probabilities with autograd and returns the loss, the metrics and the gradient of the
//! loss with respect to the log-probabilities. A training step uses that gradient as the
//! per-token weights of a linear objective, exactly as the SDK's client-side path does
//! (`weights = -dL/dlogprobs` under `cross_entropy`), but without the second request, the
//! client's torch or the round trip.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::custom_ops::{self, Callee, Value};
use crate::error::{ModelError, Result};

/// Most nodes a graph may have (a loss of a few dozen operations has a few dozen).
pub const MAX_NODES: usize = 2_000;
/// Most parameters a loss takes, `logprobs` included (the SDK's own limit).
pub const MAX_INPUTS: usize = 16;
/// Most nested levels of an encoded argument.
const MAX_DEPTH: usize = 8;
/// Most encoded arguments (constants, references, items of lists) in one graph.
const MAX_ARGS: usize = 100_000;

/// One input of a custom loss: `logprobs` first, then the `loss_fn_inputs` keys it reads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LossParam {
    /// `logprobs`, or the `loss_fn_inputs` key.
    pub name: String,
    /// 0 (a scalar), 1 (`[T]`) or 2 (`[T, K]`).
    pub rank: u8,
}

/// A constant argument (plain data, so a parsed loss can be shared between threads).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Constant {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Ellipsis,
    Dtype(Kind),
    /// A device, layout or memory format (ignored).
    Device,
}

impl Constant {
    fn value(&self) -> Value {
        match self {
            Constant::None => Value::None,
            Constant::Bool(b) => Value::Bool(*b),
            Constant::Int(i) => Value::Int(*i),
            Constant::Float(f) => Value::Float(*f),
            Constant::Str(s) => Value::Str(s.clone()),
            Constant::Ellipsis => Value::Ellipsis,
            Constant::Dtype(k) => Value::Dtype(*k),
            Constant::Device => Value::Device,
        }
    }
}

/// An argument of a node as uploaded, references resolved to node indices.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    /// A constant.
    Const(Constant),
    /// The value of an earlier node.
    Ref(usize),
    /// A list or tuple of arguments.
    Seq(Vec<Arg>, bool),
    /// A dict of arguments.
    Dict(Vec<(String, Arg)>),
    /// A slice whose bounds are arguments.
    Slice(Box<[Arg; 3]>),
}

/// One operation of the graph.
#[derive(Debug, Clone)]
struct Node {
    /// The node's name, for errors.
    name: String,
    /// What it calls.
    callee: Callee,
    args: Vec<Arg>,
    kwargs: Vec<(String, Arg)>,
}

/// A validated custom loss, ready to run.
#[derive(Debug, Clone)]
pub struct CustomLoss {
    name: String,
    params: Vec<LossParam>,
    /// The operations, in execution order (placeholders are the first `params.len()` values).
    nodes: Vec<Node>,
    /// The loss's value index.
    loss: Arg,
    /// Each metric's name and value.
    metrics: Vec<(String, Arg)>,
}

/// What a custom loss gives for one datum.
#[derive(Debug, Clone, PartialEq)]
pub struct DatumLoss {
    /// The datum's loss.
    pub loss: f64,
    /// Its metrics, in the order the loss returns them.
    pub metrics: Vec<(String, f64)>,
    /// The loss's gradient with respect to each log-probability (the datum's target shape,
    /// row after row); 0 where the loss does not depend on it.
    pub grad: Vec<f32>,
}

/// A named input of one datum for a custom loss.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NamedInput {
    /// Its shape (`[]` for a scalar).
    pub shape: Vec<i64>,
    /// Its values, row after row.
    pub values: InputValues,
}

/// The values of a [`NamedInput`], in the dtype the client sent.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum InputValues {
    /// int64 values.
    Int(Vec<i64>),
    /// float32 values.
    Float(Vec<f32>),
}

impl NamedInput {
    fn tensor(&self) -> Result<Tensor> {
        let t = match &self.values {
            InputValues::Int(v) => Tensor::from_slice(v),
            InputValues::Float(v) => Tensor::from_slice(v),
        };
        Ok(t.f_reshape(self.shape.as_slice())?)
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::invalid(field, reason)
}

/// Whether `key` is a metric name the SDK allows: `custom/<name>:sum` or `custom/<name>:mean`,
/// `<name>` 1 to 64 of `[a-z0-9_./-]`.
pub fn is_metric_name(key: &str) -> bool {
    let Some(rest) = key.strip_prefix("custom/") else {
        return false;
    };
    let Some(name) = rest
        .strip_suffix(":sum")
        .or_else(|| rest.strip_suffix(":mean"))
    else {
        return false;
    };
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_./-".contains(c))
}

/// Whether `name` is a parameter name the SDK allows (a lowercase identifier, ≤ 64 chars).
fn is_param_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Parses an encoded argument (the SDK's `_encode_arg`), resolving references against the
/// nodes named so far.
fn parse_arg(
    value: &serde_json::Value,
    names: &HashMap<String, usize>,
    depth: usize,
    budget: &mut usize,
) -> Result<Arg> {
    use serde_json::Value as J;
    let field = "graph";
    if depth > MAX_DEPTH {
        return Err(invalid(field, "an argument is nested too deeply"));
    }
    *budget = budget.checked_sub(1).ok_or_else(|| {
        invalid(
            field,
            format!("holds more than {MAX_ARGS} arguments in all"),
        )
    })?;
    let mut seq = |items: &Vec<J>, tuple: bool| -> Result<Arg> {
        let parsed = items
            .iter()
            .map(|a| parse_arg(a, names, depth + 1, budget))
            .collect::<Result<Vec<_>>>()?;
        Ok(Arg::Seq(parsed, tuple))
    };
    Ok(match value {
        J::Null => Arg::Const(Constant::None),
        J::Bool(b) => Arg::Const(Constant::Bool(*b)),
        J::Number(n) => match n.as_i64() {
            Some(i) => Arg::Const(Constant::Int(i)),
            None => Arg::Const(Constant::Float(n.as_f64().unwrap_or(f64::NAN))),
        },
        J::String(s) => Arg::Const(Constant::Str(s.clone())),
        J::Array(items) => seq(items, false)?,
        J::Object(map) => {
            let (key, inner) = match (map.len(), map.iter().next()) {
                (1, Some(entry)) => entry,
                _ => {
                    return Err(invalid(
                        field,
                        "an encoded argument object must have exactly one key",
                    ))
                }
            };
            match (key.as_str(), inner) {
                ("ref", J::String(name)) => match names.get(name) {
                    Some(&i) => Arg::Ref(i),
                    None => {
                        return Err(invalid(
                            field,
                            format!("refers to `{name}` before (or without) defining it"),
                        ))
                    }
                },
                ("tuple", J::Array(items)) => seq(items, true)?,
                ("dict", J::Object(entries)) => {
                    let items: Vec<J> = entries.values().cloned().collect();
                    let Arg::Seq(values, _) = seq(&items, false)? else {
                        unreachable!("seq gives a sequence")
                    };
                    Arg::Dict(entries.keys().cloned().zip(values).collect())
                }
                ("slice", J::Array(bounds)) if bounds.len() == 3 => {
                    let Arg::Seq(mut b, _) = seq(bounds, false)? else {
                        unreachable!("seq gives a sequence")
                    };
                    let (c, bb, a) = (b.pop(), b.pop(), b.pop());
                    match (a, bb, c) {
                        (Some(a), Some(bb), Some(c)) => Arg::Slice(Box::new([a, bb, c])),
                        _ => return Err(invalid(field, "a slice has three bounds")),
                    }
                }
                ("ellipsis", J::Bool(true)) => Arg::Const(Constant::Ellipsis),
                ("float", J::String(s)) => Arg::Const(Constant::Float(match s.as_str() {
                    "inf" => f64::INFINITY,
                    "-inf" => f64::NEG_INFINITY,
                    "nan" => f64::NAN,
                    other => {
                        return Err(invalid(field, format!("unknown float constant `{other}`")))
                    }
                })),
                ("dtype", J::String(s)) => Arg::Const(Constant::Dtype(custom_ops::parse_dtype(s)?)),
                ("device", J::String(_)) => Arg::Const(Constant::Device),
                ("layout", J::String(s)) if s == "strided" => Arg::Const(Constant::Device),
                ("memory_format", J::String(_)) => Arg::Const(Constant::Device),
                (other, _) => {
                    return Err(invalid(
                        field,
                        format!("unsupported encoded argument `{other}`"),
                    ))
                }
            }
        }
    })
}

impl CustomLoss {
    /// Rebuilds a loss from the SDK's upload: its name, its parameters (`logprobs` first) and
    /// its graph (`{"format": 1, "nodes": [...]}`). Refuses, naming the node, any callee
    /// outside loraloom's list, a reference to an undefined node, placeholders that do not
    /// match the parameters, and an output other than `(loss, {metric: value})`.
    pub fn parse(name: &str, params: Vec<LossParam>, graph: &serde_json::Value) -> Result<Self> {
        if name.is_empty() || name.len() > 128 {
            return Err(invalid("name", "must be 1 to 128 characters"));
        }
        if params.is_empty() || params.len() > MAX_INPUTS {
            return Err(invalid(
                "inputs",
                format!("a custom loss takes 1 to {MAX_INPUTS} inputs, logprobs first"),
            ));
        }
        if params[0].name != "logprobs" || !(1..=2).contains(&params[0].rank) {
            return Err(invalid(
                "inputs[0]",
                "must be `logprobs` with rank 1 ([T]) or 2 ([T, K])",
            ));
        }
        for (i, p) in params.iter().enumerate() {
            if !is_param_name(&p.name) || p.rank > 2 {
                return Err(invalid(
                    &format!("inputs[{i}]"),
                    "must be a lowercase name of letters, digits and underscores with rank 0, 1 or 2",
                ));
            }
            if params[..i].iter().any(|q| q.name == p.name) {
                return Err(invalid(
                    &format!("inputs[{i}]"),
                    format!("`{}` is named twice", p.name),
                ));
            }
        }
        if graph.get("format").and_then(|f| f.as_i64()) != Some(1) {
            return Err(invalid("graph.format", "must be 1"));
        }
        let nodes = graph
            .get("nodes")
            .and_then(|n| n.as_array())
            .ok_or_else(|| invalid("graph.nodes", "must be a list of nodes"))?;
        if nodes.len() > MAX_NODES {
            return Err(invalid(
                "graph.nodes",
                format!(
                    "has {} nodes; at most {MAX_NODES} are accepted",
                    nodes.len()
                ),
            ));
        }
        let mut names: HashMap<String, usize> = HashMap::with_capacity(nodes.len());
        let mut budget = MAX_ARGS;
        let mut ops = Vec::new();
        let mut output = None;
        for (i, node) in nodes.iter().enumerate() {
            let field = format!("graph.nodes[{i}]");
            let text = |key: &str| -> Result<String> {
                node.get(key)
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
                    .ok_or_else(|| invalid(&format!("{field}.{key}"), "must be a string"))
            };
            let (op, node_name, target) = (text("op")?, text("name")?, text("target")?);
            let at = |e: ModelError| match e {
                ModelError::InvalidInput { reason, .. } => {
                    invalid(&field, format!("node `{node_name}` ({target}): {reason}"))
                }
                other => other,
            };
            if output.is_some() {
                return Err(invalid(&field, "follows the output node"));
            }
            if names.contains_key(&node_name) {
                return Err(invalid(
                    &field,
                    format!("node name `{node_name}` is repeated"),
                ));
            }
            let empty = serde_json::Value::Array(Vec::new());
            let args = node
                .get("args")
                .unwrap_or(&empty)
                .as_array()
                .ok_or_else(|| invalid(&format!("{field}.args"), "must be a list"))?
                .iter()
                .map(|a| parse_arg(a, &names, 0, &mut budget))
                .collect::<Result<Vec<_>>>()
                .map_err(at)?;
            let kwargs = match node.get("kwargs") {
                None => Vec::new(),
                Some(serde_json::Value::Object(map)) => map
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), parse_arg(v, &names, 0, &mut budget)?)))
                    .collect::<Result<Vec<_>>>()
                    .map_err(at)?,
                Some(_) => return Err(invalid(&format!("{field}.kwargs"), "must be an object")),
            };
            match op.as_str() {
                "placeholder" => {
                    let k = names.len();
                    if !ops.is_empty() || params.get(k).map(|p| &p.name) != Some(&target) {
                        return Err(at(invalid(
                            "",
                            format!(
                                "placeholders must be the loss's inputs in order ({})",
                                params
                                    .iter()
                                    .map(|p| p.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )));
                    }
                }
                "call_function" | "call_method" => {
                    if names.len() < params.len() {
                        return Err(at(invalid("", "comes before every input is declared")));
                    }
                    let callee = Callee::resolve(&op, &target).map_err(at)?;
                    ops.push(Node {
                        name: node_name.clone(),
                        callee,
                        args,
                        kwargs,
                    });
                }
                "output" => output = Some((args, node_name.clone())),
                "get_attr" => {
                    return Err(at(invalid(
                        "",
                        "captures a tensor; a custom loss may only read logprobs and the loss_fn_inputs it names",
                    )))
                }
                "call_module" => {
                    return Err(at(invalid(
                        "",
                        "calls a torch.nn module; use torch.nn.functional functions instead",
                    )))
                }
                other => return Err(at(invalid("", format!("unknown node op `{other}`")))),
            }
            let index = names.len();
            names.insert(node_name, index);
        }
        if names.len() < params.len() {
            return Err(invalid(
                "graph.nodes",
                "declares fewer placeholders than the loss has inputs",
            ));
        }
        let (mut out, _) = output.ok_or_else(|| invalid("graph.nodes", "has no output node"))?;
        let (loss, metrics) = match (out.len(), out.pop()) {
            (1, Some(Arg::Seq(mut pair, _))) if pair.len() == 2 => {
                let metrics = pair.pop();
                let loss = pair.pop();
                match (loss, metrics) {
                    (Some(loss @ Arg::Ref(_)), Some(Arg::Dict(metrics))) => (loss, metrics),
                    _ => return Err(invalid(
                        "graph.output",
                        "must return (loss, metrics): a traced tensor and a dict of traced tensors",
                    )),
                }
            }
            _ => return Err(invalid("graph.output", "must return (loss, metrics)")),
        };
        for (key, value) in &metrics {
            if !is_metric_name(key) {
                return Err(invalid(
                    "graph.output",
                    format!("metric `{key}` must be named custom/<name>:sum or custom/<name>:mean in lowercase"),
                ));
            }
            if !matches!(value, Arg::Ref(_)) {
                return Err(invalid(
                    "graph.output",
                    format!("metric `{key}` must be a traced tensor"),
                ));
            }
        }
        Ok(CustomLoss {
            name: name.to_owned(),
            params,
            nodes: ops,
            loss,
            metrics,
        })
    }

    /// The loss's name (the traced function's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its parameters, `logprobs` first.
    pub fn params(&self) -> &[LossParam] {
        &self.params
    }

    /// The `loss_fn_inputs` keys it reads after `logprobs`, in order, with their ranks.
    pub fn input_params(&self) -> &[LossParam] {
        &self.params[1..]
    }

    /// Runs the loss on one datum: `logprobs` (the datum's target log-probabilities, `shape`
    /// `[T]` or `[T, K]`) and `inputs` (its values of [`Self::input_params`], in order). Runs on
    /// the CPU in f32 with autograd whatever the caller's grad mode, as the SDK's client-side
    /// path does, and returns the loss, the metrics and `dloss/dlogprobs`.
    pub fn evaluate(
        &self,
        logprobs: &[f32],
        shape: &[i64],
        inputs: &[NamedInput],
    ) -> Result<DatumLoss> {
        let out = self.run(logprobs, shape, inputs)?;
        if !out.loss.is_finite() || out.grad.iter().any(|g| !g.is_finite()) {
            return Err(invalid(
                "loss_fn",
                format!(
                    "custom loss `{}` gave a non-finite loss or gradient ({}) for a datum",
                    self.name, out.loss
                ),
            ));
        }
        Ok(out)
    }

    /// Runs the loss once on a datum's shapes with made-up log-probabilities (-1): what fails
    /// here (a shape mismatch, an input of the wrong kind) fails for any log-probabilities, so
    /// a request can be refused before its datums join other requests in a batch.
    pub fn check_runs(&self, shape: &[i64], inputs: &[NamedInput]) -> Result<()> {
        let n: i64 = shape.iter().product();
        self.run(&vec![-1.0; n.max(0) as usize], shape, inputs)
            .map(|_| ())
    }

    fn run(&self, logprobs: &[f32], shape: &[i64], inputs: &[NamedInput]) -> Result<DatumLoss> {
        if inputs.len() + 1 != self.params.len() {
            return Err(invalid(
                "loss_fn_inputs",
                format!(
                    "loss `{}` takes {} inputs after logprobs, got {}",
                    self.name,
                    self.params.len() - 1,
                    inputs.len()
                ),
            ));
        }
        custom_ops::reset_work();
        tch::with_grad(|| {
            let lp = Tensor::from_slice(logprobs)
                .f_reshape(shape)?
                .set_requires_grad(true);
            let mut values: Vec<Value> = Vec::with_capacity(self.params.len() + self.nodes.len());
            values.push(Value::Tensor(lp.shallow_clone()));
            for input in inputs {
                values.push(Value::Tensor(input.tensor()?));
            }
            for node in &self.nodes {
                let at = |e: ModelError| {
                    invalid(
                        "loss_fn",
                        format!(
                            "custom loss `{}`, node `{}` ({}): {}",
                            self.name,
                            node.name,
                            node.callee,
                            match e {
                                ModelError::InvalidInput { reason, .. } => reason,
                                other => other.to_string(),
                            }
                        ),
                    )
                };
                let args = node
                    .args
                    .iter()
                    .map(|a| resolve(a, &values))
                    .collect::<Result<Vec<_>>>()
                    .map_err(at)?;
                let kwargs = node
                    .kwargs
                    .iter()
                    .map(|(k, a)| Ok((k.clone(), resolve(a, &values)?)))
                    .collect::<Result<Vec<_>>>()
                    .map_err(at)?;
                let value = custom_ops::call(&node.callee, args, kwargs).map_err(at)?;
                values.push(value);
            }
            let scalar = |what: &str, arg: &Arg| -> Result<Tensor> {
                match resolve(arg, &values)? {
                    Value::Tensor(t) if t.numel() == 1 => Ok(t.f_reshape([])?),
                    Value::Tensor(t) => Err(invalid(
                        "loss_fn",
                        format!(
                            "custom loss `{}` returned {what} of shape {:?}; it must be a scalar",
                            self.name,
                            t.size()
                        ),
                    )),
                    _ => Err(invalid(
                        "loss_fn",
                        format!(
                            "custom loss `{}` returned {what} that is not a tensor",
                            self.name
                        ),
                    )),
                }
            };
            if let Value::Tensor(t) = resolve(&self.loss, &values)? {
                if t.dim() != 0 {
                    return Err(invalid(
                        "loss_fn",
                        format!(
                            "custom loss `{}` returned its loss of shape {:?}; it must be a scalar (0-dim) tensor",
                            self.name,
                            t.size()
                        ),
                    ));
                }
            }
            let loss = scalar("its loss", &self.loss)?;
            let metrics = self
                .metrics
                .iter()
                .map(|(key, arg)| {
                    let t = scalar(&format!("metric `{key}`"), arg)?;
                    Ok((key.clone(), t.f_to_kind(Kind::Double)?.f_double_value(&[])?))
                })
                .collect::<Result<Vec<_>>>()?;
            if !loss.is_floating_point() {
                return Err(invalid(
                    "loss_fn",
                    format!(
                        "custom loss `{}` returned a loss of dtype {:?}; it must be floating point",
                        self.name,
                        loss.kind()
                    ),
                ));
            }
            let loss_value = loss.f_to_kind(Kind::Double)?.f_double_value(&[])?;
            let grad = if loss.requires_grad() {
                let mut grads = Tensor::f_run_backward(&[&loss], &[&lp], false, false)?;
                grads.pop().filter(|g| g.defined())
            } else {
                None
            };
            let grad = match grad {
                Some(g) => Vec::<f32>::try_from(&g.f_to_kind(Kind::Float)?.f_reshape([-1])?)?,
                None => vec![0.0; logprobs.len()],
            };
            Ok(DatumLoss {
                loss: loss_value,
                metrics,
                grad,
            })
        })
    }
}

/// The value of an argument, given the values computed so far.
fn resolve(arg: &Arg, values: &[Value]) -> Result<Value> {
    Ok(match arg {
        Arg::Const(c) => c.value(),
        Arg::Ref(i) => values
            .get(*i)
            .ok_or_else(|| invalid("graph", "refers to a node not yet computed"))?
            .dup(),
        Arg::Seq(items, tuple) => Value::Seq(
            items
                .iter()
                .map(|a| resolve(a, values))
                .collect::<Result<Vec<_>>>()?,
            *tuple,
        ),
        Arg::Dict(entries) => Value::Dict(
            entries
                .iter()
                .map(|(k, a)| Ok((k.clone(), resolve(a, values)?)))
                .collect::<Result<Vec<_>>>()?,
        ),
        Arg::Slice(bounds) => {
            let bound = |a: &Arg| -> Result<Option<i64>> {
                match resolve(a, values)? {
                    Value::None => Ok(None),
                    Value::Int(i) => Ok(Some(i)),
                    _ => Err(invalid("graph", "slice bounds must be integers or None")),
                }
            };
            Value::Slice(bound(&bounds[0])?, bound(&bounds[1])?, bound(&bounds[2])?)
        }
    })
}

/// Metrics of many datums combined as the SDK combines them: `:sum` summed, `:mean` averaged
/// over the datums.
pub fn reduce_metrics(per_datum: &[Vec<(String, f64)>]) -> Vec<(String, f64)> {
    let mut sums: Vec<(String, f64)> = Vec::new();
    for metrics in per_datum {
        for (key, value) in metrics {
            match sums.iter_mut().find(|(k, _)| k == key) {
                Some((_, sum)) => *sum += value,
                None => sums.push((key.clone(), *value)),
            }
        }
    }
    let n = per_datum.len().max(1) as f64;
    for (key, value) in &mut sums {
        if key.ends_with(":mean") {
            *value /= n;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(list: &[(&str, u8)]) -> Vec<LossParam> {
        list.iter()
            .map(|(name, rank)| LossParam {
                name: name.to_string(),
                rank: *rank,
            })
            .collect()
    }

    /// `-(logprobs * weights).sum()` with a mean metric of `logprobs`, as torch.fx encodes it.
    fn weighted_nll() -> serde_json::Value {
        json!({"format": 1, "nodes": [
            {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
            {"op": "placeholder", "name": "weights", "target": "weights"},
            {"op": "call_function", "name": "mul", "target": "operator.mul",
             "args": [{"ref": "logprobs"}, {"ref": "weights"}]},
            {"op": "call_method", "name": "sum_1", "target": "sum", "args": [{"ref": "mul"}]},
            {"op": "call_function", "name": "neg", "target": "operator.neg", "args": [{"ref": "sum_1"}]},
            {"op": "call_method", "name": "mean", "target": "mean", "args": [{"ref": "logprobs"}]},
            {"op": "output", "name": "output", "target": "output",
             "args": [{"tuple": [{"ref": "neg"}, {"dict": {"custom/lp:mean": {"ref": "mean"}}}]}]}
        ]})
    }

    #[test]
    fn a_weighted_nll_gives_its_value_metrics_and_gradient() {
        let loss = CustomLoss::parse(
            "nll",
            params(&[("logprobs", 1), ("weights", 1)]),
            &weighted_nll(),
        )
        .unwrap();
        let weights = NamedInput {
            shape: vec![3],
            values: InputValues::Float(vec![1.0, 0.5, 0.0]),
        };
        let out = loss
            .evaluate(&[-1.0, -2.0, -4.0], &[3], std::slice::from_ref(&weights))
            .unwrap();
        assert!((out.loss - 2.0).abs() < 1e-6, "{out:?}");
        assert_eq!(out.metrics.len(), 1);
        assert!((out.metrics[0].1 + 7.0 / 3.0).abs() < 1e-6);
        assert_eq!(out.grad, vec![-1.0, -0.5, 0.0]);
        // Under no_grad (a forward-only step) the gradient is still computed.
        let again = tch::no_grad(|| {
            loss.evaluate(&[-1.0, -2.0, -4.0], &[3], std::slice::from_ref(&weights))
        })
        .unwrap();
        assert_eq!(again, out);
    }

    #[test]
    fn callees_outside_the_list_and_bad_graphs_are_refused_by_node() {
        let mut graph = weighted_nll();
        graph["nodes"][2]["target"] = json!("os.system");
        let err = CustomLoss::parse("l", params(&[("logprobs", 1), ("weights", 1)]), &graph)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("graph.nodes[2]") && err.contains("os.system"),
            "{err}"
        );

        let mut graph = weighted_nll();
        graph["nodes"][3]["args"] = json!([{"ref": "later"}]);
        let err = CustomLoss::parse("l", params(&[("logprobs", 1), ("weights", 1)]), &graph)
            .unwrap_err()
            .to_string();
        assert!(err.contains("later"), "{err}");

        let err = CustomLoss::parse(
            "l",
            params(&[("logprobs", 1), ("advantages", 1)]),
            &weighted_nll(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("placeholders"), "{err}");

        let mut graph = weighted_nll();
        graph["nodes"][6]["args"][0]["tuple"][1]["dict"] = json!({"lp": {"ref": "mean"}});
        let err = CustomLoss::parse("l", params(&[("logprobs", 1), ("weights", 1)]), &graph)
            .unwrap_err()
            .to_string();
        assert!(err.contains("custom/<name>:sum"), "{err}");
    }

    #[test]
    fn a_non_scalar_loss_fails_naming_the_loss() {
        let mut graph = weighted_nll();
        graph["nodes"][6]["args"][0]["tuple"][0] = json!({"ref": "mul"});
        let loss =
            CustomLoss::parse("vec", params(&[("logprobs", 1), ("weights", 1)]), &graph).unwrap();
        let w = NamedInput {
            shape: vec![2],
            values: InputValues::Int(vec![1, 1]),
        };
        let err = loss
            .evaluate(&[-1.0, -1.0], &[2], std::slice::from_ref(&w))
            .unwrap_err()
            .to_string();
        assert!(err.contains("vec") && err.contains("scalar"), "{err}");
        // A runtime shape error names the node.
        let w3 = NamedInput {
            shape: vec![3],
            values: InputValues::Int(vec![1, 1, 1]),
        };
        let err = loss
            .evaluate(&[-1.0, -1.0], &[2], std::slice::from_ref(&w3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("node `mul`"), "{err}");
    }

    #[test]
    fn metrics_reduce_by_their_suffix() {
        let reduced = reduce_metrics(&[
            vec![("custom/a:sum".into(), 1.0), ("custom/b:mean".into(), 2.0)],
            vec![("custom/a:sum".into(), 3.0), ("custom/b:mean".into(), 4.0)],
        ]);
        assert_eq!(
            reduced,
            vec![("custom/a:sum".into(), 4.0), ("custom/b:mean".into(), 3.0)]
        );
        assert!(is_metric_name("custom/kl.x-y_1:mean"));
        assert!(!is_metric_name("custom/KL:mean") && !is_metric_name("loss:sum"));
    }
}
