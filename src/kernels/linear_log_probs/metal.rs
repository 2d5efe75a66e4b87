//! The fused linear log-probs on Metal: chunks of rows × tiles of the vocabulary, each tile's
//! logits multiplied by MLX's Metal GEMM (candle's, f32) into one reused buffer, the tile kernels
//! of `linear_log_probs.h` (entry points in `linear_log_probs.metal`) folding or differentiating
//! them; the `[N, V]` logits never exist. MLX's GEMM writes its product (there is no β), so the
//! backward's gradient products go through a scratch buffer that `sapo_linear_accumulate` adds.
//! Nothing is read on the host. The simulation (`gpu.rs`, `sim.cpp`) runs the same loop on the
//! CPU with a plain GEMM.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalDevice, MetalError, MetalStorage, Shape, Tensor};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline};
use candle_metal_kernels::utils::{Input, Output};
use candle_metal_kernels::{call_mlx_gemm, set_params, BufferOffset, GemmDType};

use super::gpu::{tiles, Tile, METAL_PROGRAM, METAL_TILING};
use crate::kernels::gpu::metal::{input, output, pipeline, size, storage_input, threads};
use crate::kernels::log_probs::gpu::block_threads;

/// A row-major f32 operand of a GEMM: its buffer, its start in bytes, and its `[m, k]` strides in
/// elements (a transposed view swaps them).
struct Operand<'a> {
    buffer: &'a Buffer,
    offset: usize,
    strides: [usize; 2],
}

/// `out[m, n] = lhs[m, k] · rhs[k, n]` (row-major, written from the start of `out`).
fn gemm(
    device: &MetalDevice,
    encoder: &ComputeCommandEncoder,
    (m, n, k): (usize, usize, usize),
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    out: &Buffer,
) -> candle_core::Result<()> {
    call_mlx_gemm(
        device.metal_device(),
        encoder,
        device.kernels(),
        GemmDType::F32,
        (1, m, n, k),
        &lhs.strides,
        lhs.offset,
        lhs.buffer,
        &rhs.strides,
        rhs.offset,
        rhs.buffer,
        out,
    )
    .map_err(MetalError::from)?;
    Ok(())
}

/// The walk both passes make over chunks of rows × tiles of the vocabulary: each tile's logits
/// `h_chunk·W_tileᵀ` are written at the start of `logits` and handed to `body`.
fn for_each_tile(
    device: &MetalDevice,
    encoder: &ComputeCommandEncoder,
    (hidden, weight, logits): (&BufferOffset<'_>, &BufferOffset<'_>, &Buffer),
    (n, h, v): (usize, usize, usize),
    mut body: impl FnMut(Tile) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    for t in tiles(n, v, METAL_TILING) {
        let lhs = Operand {
            buffer: hidden.buffer,
            offset: hidden.offset_in_bytes + 4 * t.c0 * h,
            strides: [h, 1],
        };
        // W_tileᵀ: element (k, j) is W[v0 + j, k].
        let rhs = Operand {
            buffer: weight.buffer,
            offset: weight.offset_in_bytes + 4 * t.v0 * h,
            strides: [1, h],
        };
        gemm(device, encoder, (t.c, t.w, h), lhs, rhs, logits)?;
        body(t)?;
    }
    Ok(())
}

/// An f32 buffer of `count` elements (at least one), zeroed or not.
fn buffer(device: &MetalDevice, count: usize, zeroed: bool) -> candle_core::Result<Arc<Buffer>> {
    if zeroed {
        device.allocate_zeros(4 * count.max(1))
    } else {
        output(device, count, DType::F32, "sapo-linear-log-probs")
    }
}

/// The targets as i64 on the device (a device op; no host read).
fn target_ids(targets: &Tensor) -> candle_core::Result<Tensor> {
    targets.to_dtype(DType::I64)?.contiguous()
}

/// The forward: `[3, N]` (ℓ, H, lse), f32 inputs.
pub(super) fn forward(
    targets: &Tensor,
    (temperature, has_bias): (f64, bool),
    (hidden, hidden_layout): (&MetalStorage, &Layout),
    (weight, weight_layout): (&MetalStorage, &Layout),
    (bias, bias_layout): (&MetalStorage, &Layout),
) -> candle_core::Result<(MetalStorage, Shape)> {
    let device = hidden.device();
    let (n, h) = hidden_layout.shape().dims2()?;
    let v = weight_layout.shape().dims2()?.0;
    let ids = target_ids(targets)?;
    let fold = pipeline(device, &METAL_PROGRAM, "sapo_linear_fold")?;
    let finish = pipeline(device, &METAL_PROGRAM, "sapo_linear_finish")?;
    let (ids_guard, ids_layout) = ids.storage_and_layout();
    let ids = storage_input(&ids_guard, ids_layout)?;
    let (hidden, weight, bias) = (
        input(hidden, hidden_layout)?,
        input(weight, weight_layout)?,
        input(bias, bias_layout)?,
    );
    let (chunk, tile) = METAL_TILING;
    let logits = buffer(device, chunk.min(n) * tile.min(v), false)?;
    let state = buffer(device, 3 * n, false)?;
    let z_target = buffer(device, n, false)?;
    let out = buffer(device, 3 * n, false)?;
    {
        let encoder = device.command_encoder()?;
        let encoder = encoder.as_ref();
        encoder.set_label("sapo-linear-log-probs");
        let inv_t = (1.0 / temperature) as f32;
        let has_bias = i32::from(has_bias);
        for_each_tile(
            device,
            encoder,
            (&hidden, &weight, &logits),
            (n, h, v),
            |t| {
                encoder.set_compute_pipeline_state(&fold);
                set_params!(
                    encoder,
                    (
                        Input::new(&logits),
                        &bias,
                        has_bias,
                        t.v0 as i64,
                        t.w as i64,
                        t.c0 as i64,
                        &ids,
                        inv_t,
                        Output::new(&state),
                        Output::new(&z_target)
                    )
                );
                encoder.dispatch_thread_groups(size(t.c), threads(&fold, block_threads(t.w)));
                Ok(())
            },
        )?;
        if n > 0 {
            encoder.set_compute_pipeline_state(&finish);
            set_params!(
                encoder,
                (
                    Input::new(&state),
                    Input::new(&z_target),
                    n as i64,
                    Output::new(&out)
                )
            );
            encoder.dispatch_thread_groups(size(n.div_ceil(256)), threads(&finish, 256));
        }
    }
    Ok((
        MetalStorage::new(out, device.clone(), 3 * n, DType::F32),
        Shape::from((3, n)),
    ))
}

/// The backward: `[N·H + V·H + V]` (the hidden states', the weight's and the bias's gradients)
/// from the packed `[6, N]` forward output and upstream gradient.
pub(super) fn backward(
    targets: &Tensor,
    (temperature, has_bias): (f64, bool),
    bias: &Tensor,
    (hidden, hidden_layout): (&MetalStorage, &Layout),
    (weight, weight_layout): (&MetalStorage, &Layout),
    (packed, packed_layout): (&MetalStorage, &Layout),
) -> candle_core::Result<(MetalStorage, Shape)> {
    let device = hidden.device();
    let (n, h) = hidden_layout.shape().dims2()?;
    let v = weight_layout.shape().dims2()?.0;
    let ids = target_ids(targets)?;
    let (ids_guard, ids_layout) = ids.storage_and_layout();
    let (bias_guard, bias_layout) = bias.storage_and_layout();
    let (hidden, weight, packed) = (
        input(hidden, hidden_layout)?,
        input(weight, weight_layout)?,
        input(packed, packed_layout)?,
    );
    let (chunk, tile) = METAL_TILING;
    let total = n * h + v * h + v;
    let encoder = device.command_encoder()?;
    let pass = Backward {
        device,
        encoder: encoder.as_ref(),
        grad_tile: pipeline(device, &METAL_PROGRAM, "sapo_linear_grad_tile")?,
        bias_grad: pipeline(device, &METAL_PROGRAM, "sapo_linear_bias_grad")?,
        accumulate: pipeline(device, &METAL_PROGRAM, "sapo_linear_accumulate")?,
        ids: storage_input(&ids_guard, ids_layout)?,
        bias: storage_input(&bias_guard, bias_layout)?,
        hidden: &hidden,
        weight: &weight,
        // The forward output `[3, N]` and its upstream gradient `[3, N]`, one after the other.
        res: &packed,
        grad_res_offset: packed.offset_in_bytes + 4 * 3 * n,
        logits: buffer(device, chunk.min(n) * tile.min(v), false)?,
        product: buffer(device, chunk.min(n).max(tile.min(v)) * h, false)?,
        out: buffer(device, total, true)?,
        dims: (n, h, v),
        inv_t: (1.0 / temperature) as f32,
        has_bias,
    };
    pass.encoder.set_label("sapo-linear-log-probs-backward");
    for_each_tile(
        device,
        pass.encoder,
        (&hidden, &weight, &pass.logits),
        (n, h, v),
        |t| {
            pass.logit_gradients(t);
            pass.products(t)
        },
    )?;
    let out = pass.out.clone();
    drop(pass);
    drop(encoder);
    Ok((
        MetalStorage::new(out, device.clone(), total, DType::F32),
        Shape::from(total),
    ))
}

/// What the backward's tiles share: the encoder, the pipelines, the inputs and the buffers.
struct Backward<'a> {
    device: &'a MetalDevice,
    encoder: &'a ComputeCommandEncoder,
    grad_tile: ComputePipeline,
    bias_grad: ComputePipeline,
    accumulate: ComputePipeline,
    ids: BufferOffset<'a>,
    bias: BufferOffset<'a>,
    hidden: &'a BufferOffset<'a>,
    weight: &'a BufferOffset<'a>,
    /// The forward output `[3, N]`; its upstream gradient follows at `grad_res_offset` bytes.
    res: &'a BufferOffset<'a>,
    grad_res_offset: usize,
    /// One tile's logits, then their gradient.
    logits: Arc<Buffer>,
    /// A gradient product before it is added into `out`.
    product: Arc<Buffer>,
    /// `[N·H + V·H + V]`.
    out: Arc<Buffer>,
    dims: (usize, usize, usize),
    inv_t: f32,
    has_bias: bool,
}

impl Backward<'_> {
    /// The tile's logits' gradient, in place in `logits`, and its bias gradient.
    fn logit_gradients(&self, t: Tile) {
        let Tile { c0, c, v0, w } = t;
        let (n, h, v) = self.dims;
        let encoder = self.encoder;
        let grad_res = Input::with_offset(self.res.buffer, self.grad_res_offset);
        encoder.set_compute_pipeline_state(&self.grad_tile);
        set_params!(
            encoder,
            (
                Output::new(&self.logits),
                &self.bias,
                i32::from(self.has_bias),
                v0 as i64,
                w as i64,
                c0 as i64,
                n as i64,
                &self.ids,
                self.inv_t,
                self.res,
                grad_res
            )
        );
        encoder.dispatch_thread_groups(size(c), threads(&self.grad_tile, block_threads(w)));
        if self.has_bias {
            encoder.set_compute_pipeline_state(&self.bias_grad);
            set_params!(
                encoder,
                (
                    Input::new(&self.logits),
                    c as i64,
                    w as i64,
                    v0 as i64,
                    Output::with_offset(&self.out, 4 * (n * h + v * h))
                )
            );
            encoder.dispatch_thread_groups(size(w.div_ceil(256)), threads(&self.bias_grad, 256));
        }
    }

    /// `∂h (this chunk) += ∂L·W_tile` and `∂W (this tile) += ∂Lᵀ·h_chunk`.
    fn products(&self, t: Tile) -> candle_core::Result<()> {
        let Tile { c0, c, v0, w } = t;
        let (n, h, _) = self.dims;
        let tile_gradient = Operand {
            buffer: &self.logits,
            offset: 0,
            strides: [w, 1],
        };
        let weight_tile = Operand {
            buffer: self.weight.buffer,
            offset: self.weight.offset_in_bytes + 4 * v0 * h,
            strides: [h, 1],
        };
        gemm(
            self.device,
            self.encoder,
            (c, h, w),
            tile_gradient,
            weight_tile,
            &self.product,
        )?;
        self.add(c0 * h, c * h);
        let tile_gradient_t = Operand {
            buffer: &self.logits,
            offset: 0,
            strides: [1, w],
        };
        let hidden_chunk = Operand {
            buffer: self.hidden.buffer,
            offset: self.hidden.offset_in_bytes + 4 * c0 * h,
            strides: [h, 1],
        };
        gemm(
            self.device,
            self.encoder,
            (w, h, c),
            tile_gradient_t,
            hidden_chunk,
            &self.product,
        )?;
        self.add(n * h + v0 * h, w * h);
        Ok(())
    }

    /// `out[at..at + count] += product[..count]`.
    fn add(&self, at: usize, count: usize) {
        let encoder = self.encoder;
        encoder.set_compute_pipeline_state(&self.accumulate);
        set_params!(
            encoder,
            (
                Output::with_offset(&self.out, 4 * at),
                Input::new(&self.product),
                count as i64
            )
        );
        encoder.dispatch_thread_groups(size(count.div_ceil(256)), threads(&self.accumulate, 256));
    }
}
