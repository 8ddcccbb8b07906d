//! Decode steps recorded once and replayed (CUDA graphs).
//!
//! On a GPU a decode step of a small batch costs what the host takes to issue its kernels
//! (~20 per layer, several microseconds each), not what the device takes to run them. While a
//! decode batch keeps its rows, its adapters and its cache buffers, every step issues the same
//! kernels on the same memory; only the token ids, positions and the cache column change, and
//! [`Decoder::decode_step_static`] reads those from one device tensor. [`StepGraph`] records
//! that step (and the logits) once as a CUDA graph; each later step writes its inputs into
//! that tensor (one host-to-device copy, as an eager step makes) and replays the graph with
//! one launch.
//!
//! [`StepGraphs::Emulate`] runs the same path on any device without a graph (the static step is
//! run again where the graph would replay, its logits copied into the recorded output): the
//! CPU tests check with it that the static step, its inputs and the batch bookkeeping around
//! recording give what eager steps give.

use loraloom_cuda_graph::CudaGraph;
use tch::{Device, Tensor};

use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora::LoraBatch;

/// Whether a decode loop ([`crate::sample::Generation`]) records its steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StepGraphs {
    /// Every step is issued operation by operation.
    #[default]
    Off,
    /// On a CUDA device, a batch that keeps its rows for a second step is recorded as a CUDA
    /// graph and replayed until it changes (elsewhere, as `Off`). A failed recording leaves
    /// that batch's steps eager; three in a row turn recording off for the loop.
    Cuda,
    /// The recording path without a graph, on any device (tests).
    Emulate,
}

impl StepGraphs {
    /// What `self` means for a decoder on `device`.
    pub(crate) fn on(self, device: Device) -> StepGraphs {
        match self {
            StepGraphs::Cuda if !device.is_cuda() => StepGraphs::Off,
            other => other,
        }
    }
}

/// Whether this build can record CUDA graphs (it still needs a CUDA device to).
pub fn can_record() -> bool {
    loraloom_cuda_graph::available()
}

/// Steps recorded and replayed by a decode loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Steps recorded (each also ran).
    pub recorded: u64,
    /// Steps replayed.
    pub replayed: u64,
}

impl GraphCounts {
    /// The steps counted since `before` (an earlier reading of the same loop's counts).
    pub fn since(self, before: GraphCounts) -> GraphCounts {
        GraphCounts {
            recorded: self.recorded - before.recorded,
            replayed: self.replayed - before.replayed,
        }
    }
}

/// One recorded decode step (and logits) of a batch.
pub(crate) struct StepGraph {
    /// `None` when emulated.
    graph: Option<CudaGraph>,
    /// The step's inputs on the device (`[3 · rows + 1]`, [`Decoder::static_step_inputs`]).
    inputs: Tensor,
    /// The recorded logits `[rows, vocab]`: every replay writes them.
    logits: Tensor,
    rows: usize,
    capacity: i64,
    address: usize,
    /// What the recording reads and writes besides the decoder's weights and `inputs`: the
    /// adapters' tensors and the cache buffers, kept allocated while the graph may replay.
    _reads: Vec<Tensor>,
}

impl StepGraph {
    /// Runs the step of `host` inputs over `cache` (room reserved, advanced by the caller) and
    /// records it; returns the recording and this step's logits.
    pub(crate) fn record(
        mode: StepGraphs,
        decoder: &Decoder,
        host: &[i64],
        cache: &KvCache,
        lora: &LoraBatch,
    ) -> Result<(StepGraph, Tensor)> {
        let inputs = Tensor::from_slice(host).f_to_device(decoder.device())?;
        let run = || static_logits(decoder, &inputs, cache, lora);
        let (graph, first, logits) = match (mode, decoder.device()) {
            (StepGraphs::Cuda, Device::Cuda(index)) => {
                let captured = CudaGraph::capture(index, run)?;
                (Some(captured.graph), captured.first, captured.recorded)
            }
            (StepGraphs::Emulate, _) => {
                let logits = run()?;
                (None, logits.shallow_clone(), logits)
            }
            (mode, device) => {
                return Err(ModelError::invalid(
                    "step_graphs",
                    format!("no recording of mode {mode:?} on {device:?}"),
                ))
            }
        };
        let mut reads = lora.tensors();
        reads.extend(cache.buffers());
        let graph = StepGraph {
            graph,
            inputs,
            logits,
            rows: cache.rows(),
            capacity: cache.capacity(),
            address: cache.buffer_address(),
            _reads: reads,
        };
        Ok((graph, first))
    }

    /// Whether the recording replays over `cache` (its rows, and its buffers unmoved).
    pub(crate) fn serves(&self, cache: &KvCache) -> bool {
        cache.rows() == self.rows
            && cache.capacity() == self.capacity
            && cache.buffer_address() == self.address
    }

    /// Whether replays need the batch's [`LoraBatch`] (emulated: the step runs again).
    pub(crate) fn is_emulated(&self) -> bool {
        self.graph.is_none()
    }

    /// The step of `host` inputs (same rows, same cache as recorded): writes them into the
    /// recorded inputs and replays; returns the recorded logits, now this step's.
    pub(crate) fn replay(
        &self,
        decoder: &Decoder,
        host: &[i64],
        cache: &KvCache,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        self.inputs
            .shallow_clone()
            .f_copy_(&Tensor::from_slice(host))?;
        match (&self.graph, lora) {
            (Some(graph), _) => graph.replay()?,
            (None, Some(lora)) => {
                let logits = static_logits(decoder, &self.inputs, cache, lora)?;
                self.logits.shallow_clone().f_copy_(&logits)?;
            }
            (None, None) => {
                return Err(ModelError::invalid(
                    "lora",
                    "an emulated replay runs the step again",
                ))
            }
        }
        Ok(self.logits.shallow_clone())
    }
}

/// What a recording holds: the static decode step of `inputs` over `cache` and its logits.
fn static_logits(
    decoder: &Decoder,
    inputs: &Tensor,
    cache: &KvCache,
    lora: &LoraBatch,
) -> Result<Tensor> {
    let hidden = decoder.decode_step_static(inputs, cache, Some(lora))?;
    decoder.logits(&hidden, Some(lora))
}
