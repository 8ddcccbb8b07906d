//! Tinker JSON wire types and their conversion into validated engine types. Field names follow
//! the SDK (`tinker/types/`); unknown fields are ignored, as the SDK adds some over time.

use std::collections::HashMap;
use std::sync::Arc;

use loraloom_model::train::CustomInputs;
use loraloom_model::{
    AdamParams, CsrLayout, CustomLoss, Datum, InputValues, LossFn, LossInputs, NamedInput,
    SamplingParams, Stop, MAX_TARGETS_PER_POSITION,
};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::proto;
use crate::provenance;

/// `ModelInput`: a list of chunks; only token chunks are meaningful to a text model.
#[derive(Debug, Deserialize)]
pub struct ModelInput {
    /// The chunks.
    pub chunks: Vec<InputChunk>,
}

/// One chunk of a `ModelInput`.
#[derive(Debug, Deserialize)]
pub struct InputChunk {
    /// `encoded_text`, `image`, ...
    #[serde(rename = "type", default = "encoded_text")]
    pub kind: String,
    /// Token ids of an `encoded_text` chunk.
    #[serde(default)]
    pub tokens: Option<Vec<i64>>,
}

fn encoded_text() -> String {
    "encoded_text".into()
}

impl ModelInput {
    /// The concatenated tokens; other chunk types are refused, naming the field.
    pub fn tokens(&self, field: &str) -> ApiResult<Vec<i64>> {
        let mut out = Vec::new();
        for (i, c) in self.chunks.iter().enumerate() {
            match (c.kind.as_str(), &c.tokens) {
                ("encoded_text", Some(t)) => out.extend_from_slice(t),
                ("encoded_text", None) => {
                    return Err(ApiError::invalid(
                        format!("{field}.chunks[{i}].tokens"),
                        "is missing",
                    ))
                }
                (other, _) => {
                    return Err(ApiError::invalid(
                        format!("{field}.chunks[{i}].type"),
                        format!("chunk type `{other}` is not supported by this text model"),
                    ))
                }
            }
        }
        Ok(out)
    }
}

/// `TensorData` (JSON).
#[derive(Debug, Deserialize)]
pub struct TensorData {
    /// Flattened values.
    pub data: Vec<f64>,
    /// `int64` or `float32`.
    #[serde(default)]
    pub dtype: Option<String>,
    /// Shape.
    #[serde(default)]
    pub shape: Option<Vec<i64>>,
    /// Row pointers of a sparse CSR tensor.
    #[serde(default)]
    pub sparse_crow_indices: Option<Vec<i64>>,
    /// Column indices of a sparse CSR tensor.
    #[serde(default)]
    pub sparse_col_indices: Option<Vec<i64>>,
}

/// The values of a loss input before validation.
#[derive(Debug)]
pub enum Values {
    /// Integer values.
    Int(Vec<i64>),
    /// Float values.
    Float(Vec<f32>),
}

impl Values {
    fn len(&self) -> usize {
        match self {
            Values::Int(v) => v.len(),
            Values::Float(v) => v.len(),
        }
    }

    /// The dense `[rows, cols]` matrix of a sparse CSR tensor of these values (0 where it lists
    /// none, as the SDK's `from_torch_sparse` leaves out 0s); `None` if the layout is
    /// inconsistent.
    fn densify(self, rows: usize, cols: usize, crow: &[i64], col: &[i64]) -> Option<Values> {
        Some(match self {
            Values::Int(v) => Values::Int(densify_csr(rows, cols, crow, col, &v, 0)?),
            Values::Float(v) => Values::Float(densify_csr(rows, cols, crow, col, &v, 0.0)?),
        })
    }
}

/// A loss input before validation: its values, row after row for a 2-D `[N, K]` tensor.
#[derive(Debug)]
pub struct RawTensor {
    values: Values,
    /// K of a 2-D `[N, K]` tensor (densified if it came sparse); `None` for a 1-D one.
    columns: Option<usize>,
}

/// Most values the 2-D loss inputs of one request may hold once dense (32 MiB of ids, 16 MiB
/// of weights): a sparse tensor's body holds a few bytes per row, its dense form up to
/// [`MAX_TARGETS_PER_POSITION`] values, so the count is charged before anything is built.
/// Top-K distillation at K = 20 fits 200,000 positions; the SDK splits larger batches by bytes.
pub const MAX_REQUEST_TARGET_CELLS: usize = 1 << 22;

/// The dense row-major `[rows, cols]` matrix of a sparse CSR tensor, `fill` where it lists no
/// value; `None` unless the layout keeps torch's CSR invariants (the SDK checks them when it
/// reads a tensor): `rows + 1` offsets from 0 to the number of values, never decreasing, and
/// within a row strictly increasing columns inside the matrix.
fn densify_csr<T: Copy>(
    rows: usize,
    cols: usize,
    crow: &[i64],
    col: &[i64],
    values: &[T],
    fill: T,
) -> Option<Vec<T>> {
    let nnz = values.len() as i64;
    if crow.len() != rows + 1 || col.len() != values.len() || crow[0] != 0 || crow[rows] != nnz {
        return None;
    }
    let mut dense = vec![fill; rows.checked_mul(cols)?];
    for (r, span) in crow.windows(2).enumerate() {
        let (start, end) = (span[0], span[1]);
        if start > end || end > nnz {
            return None;
        }
        let (start, end) = (start as usize, end as usize);
        let row = &col[start..end];
        if row.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        for (&c, &value) in row.iter().zip(&values[start..end]) {
            let c = usize::try_from(c).ok().filter(|&c| c < cols)?;
            dense[r * cols + c] = value;
        }
    }
    Some(dense)
}

impl RawTensor {
    /// Checks `values` against `shape` and builds the tensor: 1-D (`shape` empty or `[len]`),
    /// or 2-D `[rows, K]` with one row per model input position (`rows`), dense or sparse CSR
    /// (`csr`: row offsets and columns). A 2-D tensor's dense size is charged to `cells` (see
    /// [`MAX_REQUEST_TARGET_CELLS`]) before it is built.
    fn shaped(
        field: &str,
        values: Values,
        shape: &[i64],
        csr: Option<(Vec<i64>, Vec<i64>)>,
        rows: usize,
        cells: &mut usize,
    ) -> ApiResult<RawTensor> {
        let invalid = |reason: String| ApiError::invalid(field, reason);
        let len = values.len();
        match (shape, csr) {
            ([], None) => Ok(RawTensor {
                values,
                columns: None,
            }),
            (&[n], None) if n == len as i64 => Ok(RawTensor {
                values,
                columns: None,
            }),
            (&[_], None) => Err(invalid(format!(
                "shape {shape:?} does not match its {len} values"
            ))),
            (&[n, k], csr) => {
                if n != rows as i64 {
                    return Err(invalid(format!(
                        "has shape {shape:?}: a 2-D loss input needs one row per model_input position ({rows})"
                    )));
                }
                let max = MAX_TARGETS_PER_POSITION;
                let k = usize::try_from(k)
                    .ok()
                    .filter(|k| (1..=max).contains(k))
                    .ok_or_else(|| {
                        invalid(format!(
                            "has shape {shape:?}: 1 to {max} values per position are accepted"
                        ))
                    })?;
                let need = rows
                    .checked_mul(k)
                    .filter(|&need| need <= *cells)
                    .ok_or_else(|| {
                        invalid(format!(
                            "makes this request's 2-D loss inputs hold more than {MAX_REQUEST_TARGET_CELLS} values; send fewer datums per request"
                        ))
                    })?;
                *cells -= need;
                let values = match csr {
                    None if len == need => values,
                    None => {
                        return Err(invalid(format!(
                            "shape {shape:?} does not match its {len} values"
                        )))
                    }
                    Some((crow, col)) => values
                        .densify(rows, k, &crow, &col)
                        .ok_or_else(|| invalid("inconsistent sparse CSR indices".into()))?,
                };
                Ok(RawTensor {
                    values,
                    columns: Some(k),
                })
            }
            (_, Some(_)) => Err(invalid(format!(
                "is sparse with shape {shape:?}; a sparse loss input must be 2-D [N, K]"
            ))),
            _ => Err(invalid(format!(
                "has shape {shape:?}; loss inputs are 1-D [N] (target_tokens and weights may be 2-D [N, K])"
            ))),
        }
    }

    fn ints(self, field: &str) -> ApiResult<Vec<i64>> {
        match self.values {
            Values::Int(v) => Ok(v),
            Values::Float(v) => {
                if v.iter().all(|x| x.fract() == 0.0 && x.is_finite()) {
                    Ok(v.into_iter().map(|x| x as i64).collect())
                } else {
                    Err(ApiError::invalid(field, "must hold integers (dtype int64)"))
                }
            }
        }
    }

    fn floats(self) -> Vec<f32> {
        match self.values {
            Values::Int(v) => v.into_iter().map(|x| x as f32).collect(),
            Values::Float(v) => v,
        }
    }

    /// A custom loss's input of declared `rank`: 0 (one value, sent with shape `[]` or none),
    /// 1 (`[N]`) or 2 (`[N, K]`, one row per model input position).
    fn named(self, field: &str, rank: u8) -> ApiResult<NamedInput> {
        let len = self.values.len() as i64;
        let shape = match (rank, self.columns) {
            (0, None) if len == 1 => Vec::new(),
            (1, None) => vec![len],
            (2, Some(k)) => vec![len / k as i64, k as i64],
            (_, columns) => {
                let sent = match columns {
                    Some(_) => "2".to_string(),
                    None if len == 1 => "0 or 1".to_string(),
                    None => "1".to_string(),
                };
                return Err(ApiError::invalid(
                    field,
                    format!("has rank {sent}, but the custom loss declared it with rank {rank}"),
                ));
            }
        };
        let values = match self.values {
            Values::Int(v) => InputValues::Int(v),
            Values::Float(v) => InputValues::Float(v),
        };
        Ok(NamedInput { shape, values })
    }

    /// The values of a loss input that must be 1-D.
    fn floats_1d(self, field: &str) -> ApiResult<Vec<f32>> {
        if self.columns.is_some() {
            return Err(ApiError::invalid(
                field,
                "must be 1-D [N]: only target_tokens and weights may be 2-D [N, K]",
            ));
        }
        Ok(self.floats())
    }
}

impl TensorData {
    /// Validated values of a loss input of a datum whose model input has `rows` positions;
    /// see [`RawTensor::shaped`] for `cells`.
    pub fn into_raw(mut self, field: &str, rows: usize, cells: &mut usize) -> ApiResult<RawTensor> {
        let csr = self.csr(field)?;
        let values = match self.dtype.as_deref().unwrap_or("float32") {
            "int64" | "int32" => {
                if self.data.iter().any(|x| x.fract() != 0.0 || !x.is_finite()) {
                    return Err(ApiError::invalid(
                        field,
                        "dtype int64 but holds non-integers",
                    ));
                }
                Values::Int(self.data.into_iter().map(|x| x as i64).collect())
            }
            "float32" | "float64" | "bfloat16" => {
                Values::Float(self.data.into_iter().map(|x| x as f32).collect())
            }
            other => {
                return Err(ApiError::invalid(
                    format!("{field}.dtype"),
                    format!("unknown dtype `{other}`"),
                ))
            }
        };
        let shape = self.shape.unwrap_or_default();
        RawTensor::shaped(field, values, &shape, csr, rows, cells)
    }

    /// The row offsets and columns of a sparse CSR tensor (`None`: dense), taken out of it;
    /// one without the other is refused.
    fn csr(&mut self, field: &str) -> ApiResult<Option<(Vec<i64>, Vec<i64>)>> {
        match (
            self.sparse_crow_indices.take(),
            self.sparse_col_indices.take(),
        ) {
            (None, None) => Ok(None),
            (Some(crow), Some(col)) => Ok(Some((crow, col))),
            _ => Err(ApiError::invalid(
                field,
                "a sparse tensor needs both crow and col indices",
            )),
        }
    }
}

/// Most rows of an id matrix (more than any context holds).
const MAX_ID_ROWS: i64 = 1 << 20;

impl TensorData {
    /// A 2-D int64 matrix of token ids with `want_rows` rows (one per prompt position after the
    /// first), dense or sparse CSR (then with its layout); cells a sparse tensor does not list
    /// are `fill`. The row count is checked before the matrix is built: a sparse tensor's body
    /// holds a few bytes per row, its matrix up to [`loraloom_model::MAX_SCORED_WIDTH`] ids.
    pub fn into_id_matrix(
        mut self,
        field: &str,
        fill: i64,
        want_rows: usize,
    ) -> ApiResult<(Vec<Vec<i64>>, Option<CsrLayout>)> {
        let invalid = |reason: String| ApiError::invalid(field, reason);
        let shape = self.shape.clone().unwrap_or_default();
        let [rows, cols] = shape[..] else {
            return Err(invalid(format!(
                "must be 2-D [positions, ids], got shape {shape:?}"
            )));
        };
        // Bounded before anything is allocated from it (the model checks the exact bounds).
        let widest = loraloom_model::MAX_SCORED_WIDTH as i64;
        if !(0..=MAX_ID_ROWS).contains(&rows) || !(1..=widest).contains(&cols) {
            return Err(invalid(format!(
                "shape {shape:?}: at most {MAX_ID_ROWS} rows of 1 to {widest} ids"
            )));
        }
        let (rows, cols) = (rows as usize, cols as usize);
        if rows != want_rows {
            return Err(invalid(format!(
                "must have one row per prompt position after the first ({want_rows}), got {rows}"
            )));
        }
        if !matches!(self.dtype.as_deref(), None | Some("int64")) {
            return Err(invalid("must have dtype int64".into()));
        }
        if self.data.iter().any(|x| x.fract() != 0.0 || !x.is_finite()) {
            return Err(invalid("must hold integers".into()));
        }
        let ids: Vec<i64> = self.data.iter().map(|&x| x as i64).collect();
        match self.csr(field)? {
            None => {
                if ids.len() != rows * cols {
                    return Err(invalid(format!(
                        "shape {shape:?} does not match its {} values",
                        ids.len()
                    )));
                }
                Ok((ids.chunks(cols.max(1)).map(<[i64]>::to_vec).collect(), None))
            }
            Some((crow, col)) => {
                // The answer keeps this layout, so it must be one the SDK reads back.
                let dense = densify_csr(rows, cols, &crow, &col, &ids, fill)
                    .ok_or_else(|| invalid("inconsistent sparse CSR indices".into()))?;
                let matrix = dense.chunks(cols).map(<[i64]>::to_vec).collect();
                Ok((matrix, Some(CsrLayout { crow, col })))
            }
        }
    }
}

/// Converts a protobuf loss input of a datum whose model input has `rows` positions; see
/// [`RawTensor::shaped`] for `cells`.
pub fn proto_tensor(
    field: &str,
    t: proto::Tensor,
    rows: usize,
    cells: &mut usize,
) -> ApiResult<RawTensor> {
    let ragged = |what: &str| ApiError::invalid(field, format!("{what} byte length is ragged"));
    let (bytes, csr) = match t.encoding {
        Some(proto::Encoding::Dense(b)) => (b, None),
        Some(proto::Encoding::SparseCsr(csr)) => {
            let crow = proto::unpack(&csr.crow_indices, i64::from_le_bytes)
                .ok_or_else(|| ragged("crow_indices"))?;
            let col = proto::unpack(&csr.col_indices, i64::from_le_bytes)
                .ok_or_else(|| ragged("col_indices"))?;
            (csr.values, Some((crow, col)))
        }
        None => (Vec::new(), None),
    };
    let values = match t.dtype {
        proto::dtype::INT64 => {
            Values::Int(proto::unpack(&bytes, i64::from_le_bytes).ok_or_else(|| ragged("int64"))?)
        }
        proto::dtype::INT32 => Values::Int(
            proto::unpack(&bytes, i32::from_le_bytes)
                .ok_or_else(|| ragged("int32"))?
                .into_iter()
                .map(i64::from)
                .collect(),
        ),
        proto::dtype::FLOAT32 => Values::Float(
            proto::unpack(&bytes, f32::from_le_bytes).ok_or_else(|| ragged("float32"))?,
        ),
        other => {
            return Err(ApiError::invalid(
                format!("{field}.dtype"),
                format!("unsupported dtype {other}"),
            ))
        }
    };
    RawTensor::shaped(field, values, &t.shape, csr, rows, cells)
}

/// Builds datum `index` from its tokens and named loss inputs; with a custom loss, its inputs
/// are the ones the loss reads (others are ignored, as the SDK's client-side path ignores them).
pub fn build_datum(
    index: usize,
    tokens: Vec<i64>,
    mut inputs: HashMap<String, RawTensor>,
    custom: Option<&NamedLoss>,
) -> ApiResult<Datum> {
    let field = |name: &str| format!("data[{index}].loss_fn_inputs.{name}");
    let targets = inputs
        .remove("target_tokens")
        .ok_or_else(|| ApiError::invalid(field("target_tokens"), "is required"))?;
    let targets_per_position = targets.columns;
    let target_tokens = targets.ints(&field("target_tokens"))?;
    if let Some((loss_id, loss)) = custom {
        let values = loss
            .input_params()
            .iter()
            .map(|param| {
                let f = field(&param.name);
                let raw = inputs.remove(&param.name).ok_or_else(|| {
                    ApiError::invalid(&f, format!("is required by custom loss `{}`", loss.name()))
                })?;
                raw.named(&f, param.rank)
            })
            .collect::<ApiResult<Vec<_>>>()?;
        return Ok(Datum {
            input_tokens: tokens,
            loss_inputs: LossInputs::targets(target_tokens, targets_per_position),
            custom: Some(CustomInputs {
                loss: loss.clone(),
                loss_id: loss_id.to_string(),
                inputs: values,
            }),
        });
    }
    let weights =
        match inputs.remove("weights") {
            Some(w) if w.columns != targets_per_position => return Err(ApiError::invalid(
                field("weights"),
                "must have the shape of target_tokens ([N], or [N, K] for K targets per position)",
            )),
            w => w.map(RawTensor::floats),
        };
    let mut one_per_position = |name: &str| {
        inputs
            .remove(name)
            .map(|t| t.floats_1d(&field(name)))
            .transpose()
    };
    let logprobs = one_per_position("logprobs")?;
    let advantages = one_per_position("advantages")?;
    let sequence_ratio_mask = one_per_position("sequence_ratio_mask")?;
    if let Some(name) = inputs.keys().next() {
        return Err(ApiError::invalid(
            field(name),
            "is not an input loraloom's losses use (target_tokens, weights, logprobs, advantages, sequence_ratio_mask)",
        ));
    }
    Ok(Datum {
        input_tokens: tokens,
        loss_inputs: LossInputs {
            target_tokens,
            weights,
            logprobs,
            advantages,
            sequence_ratio_mask,
            recorded: None,
            targets_per_position,
        },
        custom: None,
    })
}

/// JSON `Datum`.
#[derive(Debug, Deserialize)]
pub struct JsonDatum {
    /// The model input.
    pub model_input: ModelInput,
    /// Loss inputs by name.
    #[serde(default)]
    pub loss_fn_inputs: HashMap<String, TensorData>,
    /// Where each model input token came from.
    #[serde(default)]
    pub model_input_spans: Option<Vec<provenance::JsonSpan>>,
    /// Where each target token came from.
    #[serde(default)]
    pub loss_fn_input_spans: Option<Vec<provenance::JsonSpan>>,
}

/// JSON body of `forward_backward` / `forward` for clients without protobuf.
#[derive(Debug, Deserialize)]
pub struct JsonForwardBackwardRequest {
    /// The run.
    pub model_id: String,
    /// `{data, loss_fn, loss_fn_config}` (`forward_input` in the SDK's `ForwardRequest`).
    #[serde(alias = "forward_input")]
    pub forward_backward_input: JsonForwardBackwardInput,
    /// `forward` when true.
    #[serde(default)]
    pub forward_only: bool,
}

/// The input of a JSON `forward_backward`.
#[derive(Debug, Deserialize)]
pub struct JsonForwardBackwardInput {
    /// The datums.
    pub data: Vec<JsonDatum>,
    /// Loss name.
    pub loss_fn: String,
    /// Loss configuration: numbers, or (loss `custom`) the `loss_id` string.
    #[serde(default)]
    pub loss_fn_config: Option<HashMap<String, JsonConfigValue>>,
}

/// A `loss_fn_config` value of a JSON request.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum JsonConfigValue {
    /// A number.
    Number(f64),
    /// A string (`loss_id`).
    Text(String),
}

/// Looks up the caller's custom loss by id (`loss_fn_config.loss_id`).
pub type CustomLosses<'a> = &'a dyn Fn(&str) -> ApiResult<Arc<CustomLoss>>;

/// The request's loss: a built-in one from its name and numbers, or (`custom`) the caller's
/// custom loss named by the one string `loss_id` (then the built-in loss is ignored).
/// A custom loss and the id `create_custom_loss` answered for it.
type NamedLoss = (String, Arc<CustomLoss>);

fn request_loss(
    name: &str,
    config: Vec<(String, proto::ConfigValue)>,
    custom: CustomLosses,
) -> ApiResult<(LossFn, Option<NamedLoss>)> {
    if name == "custom" {
        let mut loss_id = None;
        for (k, v) in config {
            match (k.as_str(), v) {
                ("loss_id", proto::ConfigValue::Text(id)) => loss_id = Some(id),
                _ => {
                    return Err(ApiError::invalid(
                        format!("loss_fn_config.{k}"),
                        "loss `custom` takes one config value, the string `loss_id` of a loss made by create_custom_loss",
                    ))
                }
            }
        }
        let id = loss_id.ok_or_else(|| {
            ApiError::invalid(
                "loss_fn_config.loss_id",
                "is required by loss `custom` (the id create_custom_loss answered)",
            )
        })?;
        let loss = custom(&id)?;
        return Ok((LossFn::CrossEntropy, Some((id, loss))));
    }
    let mut numbers: Vec<(String, f64)> = Vec::new();
    for (k, v) in config {
        match v {
            proto::ConfigValue::Number(x) => numbers.push((k, x)),
            proto::ConfigValue::Text(_) => {
                return Err(ApiError::invalid(
                    format!("loss_fn_config.{k}"),
                    "must be a number",
                ))
            }
        }
    }
    Ok((LossFn::from_name(name, &numbers).map_err(to_api)?, None))
}

/// A parsed forward_backward request.
pub struct TrainInput {
    /// The run.
    pub model_id: String,
    /// The datums.
    pub data: Vec<Datum>,
    /// The loss.
    pub loss: LossFn,
    /// Accumulate gradients.
    pub backward: bool,
    /// Each datum's provenance spans, if it has them.
    pub provenance: Vec<Option<provenance::Provenance>>,
}

impl JsonForwardBackwardRequest {
    /// Validates into engine types.
    pub fn into_input(self, force_forward: bool, custom: CustomLosses) -> ApiResult<TrainInput> {
        let input = self.forward_backward_input;
        let config = input
            .loss_fn_config
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| match v {
                JsonConfigValue::Number(x) => (k, proto::ConfigValue::Number(x)),
                JsonConfigValue::Text(t) => (k, proto::ConfigValue::Text(t)),
            })
            .collect();
        let (loss, custom) = request_loss(&input.loss_fn, config, custom)?;
        let mut data = Vec::with_capacity(input.data.len());
        let mut spans = Vec::with_capacity(input.data.len());
        let mut cells = MAX_REQUEST_TARGET_CELLS;
        for (i, d) in input.data.into_iter().enumerate() {
            let tokens = d.model_input.tokens(&format!("data[{i}].model_input"))?;
            let mut raw = HashMap::new();
            for (name, t) in d.loss_fn_inputs {
                let f = format!("data[{i}].loss_fn_inputs.{name}");
                raw.insert(name, t.into_raw(&f, tokens.len(), &mut cells)?);
            }
            let datum = build_datum(i, tokens, raw, custom.as_ref())?;
            let model_input = provenance::from_json(
                &format!("data[{i}].model_input_spans"),
                d.model_input_spans.unwrap_or_default(),
            )?;
            let targets = provenance::from_json(
                &format!("data[{i}].loss_fn_input_spans"),
                d.loss_fn_input_spans.unwrap_or_default(),
            )?;
            spans.push(provenance::check(i, &datum, model_input, targets)?);
            data.push(datum);
        }
        Ok(TrainInput {
            model_id: self.model_id,
            data,
            loss,
            backward: !(self.forward_only || force_forward),
            provenance: spans,
        })
    }
}

/// Converts the SDK's protobuf request.
pub fn proto_train_input(
    req: proto::ForwardBackwardRequest,
    custom: CustomLosses,
) -> ApiResult<TrainInput> {
    let mut config: Vec<(String, proto::ConfigValue)> = Vec::new();
    for (k, v) in req.loss_fn_config_v2 {
        match v.value {
            Some(value) => config.push((k, value)),
            None => {
                return Err(ApiError::invalid(
                    format!("loss_fn_config.{k}"),
                    "has no value",
                ))
            }
        }
    }
    for (k, v) in req.loss_fn_config {
        if !config.iter().any(|(c, _)| *c == k) {
            config.push((k, proto::ConfigValue::Number(v)));
        }
    }
    let (loss, custom) = request_loss(&req.loss_fn, config, custom)?;
    let mut data = Vec::with_capacity(req.data.len());
    let mut spans = Vec::with_capacity(req.data.len());
    let mut cells = MAX_REQUEST_TARGET_CELLS;
    for (i, d) in req.data.into_iter().enumerate() {
        let mut tokens = Vec::new();
        for (c, chunk) in d.model_input.into_iter().enumerate() {
            match chunk.chunk {
                Some(proto::ChunkKind::EncodedText(t)) => tokens.extend(
                    proto::unpack(&t.tokens, i32::from_le_bytes)
                        .ok_or_else(|| {
                            ApiError::invalid(
                                format!("data[{i}].model_input.chunks[{c}].tokens"),
                                "ragged int32 bytes",
                            )
                        })?
                        .into_iter()
                        .map(i64::from),
                ),
                _ => {
                    return Err(ApiError::invalid(
                        format!("data[{i}].model_input.chunks[{c}]"),
                        "only encoded_text chunks are supported by this text model",
                    ))
                }
            }
        }
        let mut raw = HashMap::new();
        for (name, t) in d.loss_fn_inputs {
            let f = format!("data[{i}].loss_fn_inputs.{name}");
            raw.insert(name, proto_tensor(&f, t, tokens.len(), &mut cells)?);
        }
        let datum = build_datum(i, tokens, raw, custom.as_ref())?;
        let model_input =
            provenance::from_proto(&format!("data[{i}].model_input_spans"), d.model_input_spans)?;
        let targets = provenance::from_proto(
            &format!("data[{i}].loss_fn_input_spans"),
            d.loss_fn_input_spans,
        )?;
        spans.push(provenance::check(i, &datum, model_input, targets)?);
        data.push(datum);
    }
    Ok(TrainInput {
        model_id: req.model_id,
        data,
        loss,
        backward: !req.forward_only,
        provenance: spans,
    })
}

fn to_api(e: loraloom_model::ModelError) -> ApiError {
    ApiError::Engine(e.into())
}

/// `LoraConfig` of `create_model`.
#[derive(Debug, Deserialize)]
pub struct LoraConfig {
    /// Rank (SDK default 32).
    #[serde(default = "default_rank")]
    pub rank: i64,
    /// Seed of the initialisation (any 64-bit integer, negative too, as Python allows).
    #[serde(default, deserialize_with = "any_seed")]
    pub seed: Option<u64>,
    /// Adapt the MLP.
    #[serde(default = "yes")]
    pub train_mlp: bool,
    /// Adapt attention.
    #[serde(default = "yes")]
    pub train_attn: bool,
    /// Adapt the unembedding.
    #[serde(default = "yes")]
    pub train_unembed: bool,
}

/// A seed given as any signed or unsigned 64-bit integer; a negative one keeps its bits.
fn any_seed<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seed {
        Unsigned(u64),
        Signed(i64),
    }
    Ok(Option::<Seed>::deserialize(de)?.map(|seed| match seed {
        Seed::Unsigned(u) => u,
        Seed::Signed(i) => i as u64,
    }))
}

fn default_rank() -> i64 {
    32
}

fn yes() -> bool {
    true
}

/// `AdamParams`.
#[derive(Debug, Deserialize)]
pub struct WireAdamParams {
    /// Learning rate.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// beta1.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// beta2.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// eps.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    #[serde(default)]
    pub grad_clip_norm: f64,
}

fn default_lr() -> f64 {
    AdamParams::default().learning_rate
}
fn default_beta1() -> f64 {
    AdamParams::default().beta1
}
fn default_beta2() -> f64 {
    AdamParams::default().beta2
}
fn default_eps() -> f64 {
    AdamParams::default().eps
}

impl WireAdamParams {
    /// Validated parameters.
    pub fn into_params(self) -> ApiResult<AdamParams> {
        let p = AdamParams {
            learning_rate: self.learning_rate,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            grad_clip_norm: self.grad_clip_norm,
        };
        p.validate().map_err(to_api)?;
        Ok(p)
    }
}

/// `stop`: a string, a list of strings, a list of token ids, or null.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum WireStop {
    /// One string.
    One(String),
    /// Token ids.
    Tokens(Vec<i64>),
    /// Strings.
    Strings(Vec<String>),
}

/// `SamplingParams`.
#[derive(Debug, Deserialize)]
pub struct WireSamplingParams {
    /// Tokens to generate (default 16... the SDK leaves it to the server).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Seed (any 64-bit integer, negative too, as Python allows).
    #[serde(default, deserialize_with = "any_seed")]
    pub seed: Option<u64>,
    /// Stop condition.
    #[serde(default)]
    pub stop: Option<WireStop>,
    /// Temperature (default 1).
    #[serde(default = "one")]
    pub temperature: f64,
    /// Top-k (-1 = no limit).
    #[serde(default = "minus_one")]
    pub top_k: i64,
    /// Top-p (default 1).
    #[serde(default = "one")]
    pub top_p: f64,
}

fn one() -> f64 {
    1.0
}
fn minus_one() -> i64 {
    -1
}

impl WireSamplingParams {
    /// Engine sampling parameters (range checks happen before the job runs).
    pub fn into_params(self) -> SamplingParams {
        SamplingParams {
            max_tokens: self.max_tokens.unwrap_or(16),
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop: match self.stop {
                None => Stop::Eos,
                Some(WireStop::One(s)) => Stop::Strings(vec![s]),
                Some(WireStop::Tokens(t)) if t.is_empty() => Stop::Never,
                Some(WireStop::Tokens(t)) => Stop::Tokens(t),
                Some(WireStop::Strings(s)) if s.is_empty() => Stop::Never,
                Some(WireStop::Strings(s)) => Stop::Strings(s),
            },
        }
    }
}

/// The immediate answer of a future-returning call.
#[derive(Debug, Serialize)]
pub struct Promise {
    /// The future's id.
    pub request_id: String,
    /// The run, when the call concerns one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// One id per sample (`asample`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_sequence_ids: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sparse CSR id matrix of `rows` rows of 128 ids, none listed.
    fn empty_sparse(rows: usize) -> TensorData {
        TensorData {
            data: Vec::new(),
            dtype: Some("int64".into()),
            shape: Some(vec![rows as i64, 128]),
            sparse_crow_indices: Some(vec![0; rows + 1]),
            sparse_col_indices: Some(Vec::new()),
        }
    }

    #[test]
    fn a_sparse_id_matrix_with_rows_the_prompt_lacks_is_refused_before_it_is_built() {
        // 2^20 rows of 128 ids would be 1 GiB built; its body is 2 MiB of row offsets.
        let err = empty_sparse(1 << 20)
            .into_id_matrix("target_prompt_logprobs", -1, 3)
            .expect_err("refused");
        assert!(
            err.to_string().contains("one row per prompt position"),
            "{err}"
        );
        let (rows, layout) = empty_sparse(3)
            .into_id_matrix("target_prompt_logprobs", -1, 3)
            .expect("the prompt's rows");
        assert_eq!(rows, vec![vec![-1; 128]; 3]);
        assert!(layout.is_some());
    }

    /// A 2-D loss input `[rows, k]` as the SDK sends it sparse: `values` at `(row, col)`.
    fn sparse_loss_input(rows: usize, k: usize, listed: &[(usize, usize, f64)]) -> TensorData {
        let mut crow = vec![0i64; rows + 1];
        for &(r, _, _) in listed {
            crow[r + 1..].iter_mut().for_each(|c| *c += 1);
        }
        TensorData {
            data: listed.iter().map(|&(_, _, v)| v).collect(),
            dtype: Some("float32".into()),
            shape: Some(vec![rows as i64, k as i64]),
            sparse_crow_indices: Some(crow),
            sparse_col_indices: Some(listed.iter().map(|&(_, c, _)| c as i64).collect()),
        }
    }

    #[test]
    fn two_d_loss_inputs_are_densified_with_zeros_and_charged_before_they_are_built() {
        let mut cells = MAX_REQUEST_TARGET_CELLS;
        let weights = sparse_loss_input(3, 2, &[(0, 1, 0.5), (2, 0, 0.25), (2, 1, 0.75)])
            .into_raw("weights", 3, &mut cells)
            .unwrap();
        assert_eq!(weights.columns, Some(2));
        assert_eq!(weights.floats(), vec![0.0, 0.5, 0.0, 0.0, 0.25, 0.75]);
        assert_eq!(cells, MAX_REQUEST_TARGET_CELLS - 6);
        // One row per model input position.
        let err = sparse_loss_input(4, 2, &[])
            .into_raw("weights", 3, &mut cells)
            .expect_err("refused");
        assert!(
            err.to_string()
                .contains("one row per model_input position (3)"),
            "{err}"
        );
        // 4 positions of 1024 values, empty on the wire, would be 4096 values built: refused
        // once the request's budget cannot hold them, before anything is allocated.
        let mut cells = 5000;
        sparse_loss_input(4, 1024, &[])
            .into_raw("target_tokens", 4, &mut cells)
            .unwrap();
        let err = sparse_loss_input(4, 1024, &[])
            .into_raw("target_tokens", 4, &mut cells)
            .expect_err("over budget");
        assert!(err.to_string().contains("more than"), "{err}");
        // Columns must increase within a row and stay inside the matrix.
        let err = sparse_loss_input(2, 2, &[(0, 1, 1.0), (0, 0, 1.0)])
            .into_raw("weights", 2, &mut MAX_REQUEST_TARGET_CELLS.clone())
            .expect_err("unsorted");
        assert!(err.to_string().contains("sparse CSR"), "{err}");
        let err = sparse_loss_input(2, 2, &[(1, 2, 1.0)])
            .into_raw("weights", 2, &mut MAX_REQUEST_TARGET_CELLS.clone())
            .expect_err("outside");
        assert!(err.to_string().contains("sparse CSR"), "{err}");
    }
}
