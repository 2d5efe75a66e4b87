//! Reading a Llama GGUF file for training: the hyper-parameters from its metadata and every tensor
//! dequantized to f32 (candle's GGUF reader and dequantizers).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use crate::AnyResult;

/// The hyper-parameters of a Llama GGUF (`llama.*` metadata).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
    pub context: usize,
}

/// A GGUF file read into memory: its metadata and its tensors as f32, by GGUF name.
pub struct Gguf {
    pub config: Config,
    pub metadata: HashMap<String, gguf_file::Value>,
    pub tensors: HashMap<String, Tensor>,
}

fn get<'a>(
    metadata: &'a HashMap<String, gguf_file::Value>,
    key: &str,
) -> AnyResult<&'a gguf_file::Value> {
    metadata
        .get(key)
        .ok_or_else(|| format!("GGUF metadata lacks `{key}`").into())
}

fn get_usize(metadata: &HashMap<String, gguf_file::Value>, key: &str) -> AnyResult<usize> {
    let value = get(metadata, key)?;
    Ok(match value {
        gguf_file::Value::U64(v) => *v as usize,
        other => other.to_u32()? as usize,
    })
}

impl Config {
    /// From the `llama.*` keys; the architecture must be `llama`.
    pub fn from_metadata(metadata: &HashMap<String, gguf_file::Value>) -> AnyResult<Self> {
        let arch = get(metadata, "general.architecture")?.to_string()?;
        if arch != "llama" {
            return Err(format!("architecture `{arch}`: only `llama` is supported").into());
        }
        let hidden = get_usize(metadata, "llama.embedding_length")?;
        let heads = get_usize(metadata, "llama.attention.head_count")?;
        let kv_heads = get_usize(metadata, "llama.attention.head_count_kv")?;
        if heads == 0 || hidden % heads != 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!(
                "heads: {heads} query and {kv_heads} key/value heads for hidden size {hidden}"
            )
            .into());
        }
        let head_dim = hidden / heads;
        if let Ok(rope_dim) = get_usize(metadata, "llama.rope.dimension_count") {
            if rope_dim != head_dim {
                return Err(format!("rope over {rope_dim} of {head_dim} dimensions").into());
            }
        }
        let tokens = get(metadata, "tokenizer.ggml.tokens")?.to_vec()?.len();
        Ok(Self {
            vocab: tokens,
            hidden,
            layers: get_usize(metadata, "llama.block_count")?,
            heads,
            kv_heads,
            head_dim,
            intermediate: get_usize(metadata, "llama.feed_forward_length")?,
            rope_base: get(metadata, "llama.rope.freq_base")
                .and_then(|v| Ok(v.to_f32()?))
                .unwrap_or(10_000.0) as f64,
            rms_eps: get(metadata, "llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            context: get_usize(metadata, "llama.context_length")?,
        })
    }
}

impl Gguf {
    /// Reads `path`, dequantizing every tensor to f32 on `device`.
    pub fn read(path: &Path, device: &Device) -> AnyResult<Self> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| format!("cannot open the model {}: {e}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)?;
        let config = Config::from_metadata(&content.metadata)?;
        let mut tensors = HashMap::new();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let q = content.tensor(&mut file, name, device)?;
            tensors.insert(name.clone(), q.dequantize(device)?.to_dtype(DType::F32)?);
        }
        Ok(Self {
            config,
            metadata: content.metadata,
            tensors,
        })
    }

    /// Takes the tensor `name` out, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> AnyResult<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| format!("the GGUF has no tensor `{name}`"))?;
        if t.dims() != shape {
            return Err(format!("`{name}` is {:?}, expected {shape:?}", t.dims()).into());
        }
        Ok(t)
    }
}
